"""The one GroupNorm grouping of the package (couplings' sub-networks and the net's stem/head)."""

from __future__ import annotations

__all__ = ["group_count"]


def group_count(channels: int, preferred: int = 8) -> int:
    """The largest group count ``<= preferred`` that divides ``channels`` (GroupNorm needs a divisor).

    ``group_count(32) == 8``, ``group_count(6) == 6``, ``group_count(12) == 6``, ``group_count(7) == 7``.
    Per-sample statistics whatever the count: unlike BatchNorm, no batch dependence.
    """
    if channels < 1 or preferred < 1:
        raise ValueError(f"group_count: channels and preferred must be >= 1, got {channels}, {preferred}")
    return next(g for g in range(min(preferred, channels), 0, -1) if channels % g == 0)
