"""Values kept at forward and replayed when backward rebuilds a computation.

A memory-efficient segment evaluates each op's sub-network again in backward. On depth shards
(:mod:`idm3d.domain`) a few of its layers make a small replicated value with a collective: the
GroupNorm statistics, the channel attention's Gram matrix, the spatial attention's gathered lowest
level. The segment's node opens a :class:`Record` while its forward runs (one slot per op and one
for the head) and replays that op's slot while backward rebuilds it; a layer keeps its value with
:func:`keep` and looks it up with :func:`replayed`, so the rebuild reuses exactly the forward's
numbers and needs no collective of its own (the collectives of the gradients stay). As
:mod:`~idm3d.invertible.rng` does for random numbers: record in forward, replay in the rebuild.

A layer that never calls :func:`keep` costs nothing: a slot is made on a layer's first :func:`keep`.
A module evaluated more than once in one op's forward (weights shared within the op) has no single
value to replay and computes (communicates) again, which is always correct, only not cheaper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

__all__ = ["Record", "keep", "recording", "replayed"]


class Record:
    """The values one segment node's layers kept at forward, by op and module.

    ``op`` is the slot being filled (forward) or replayed (the rebuild in backward); the segment sets
    it before each op and its head. ``replay`` turns :func:`keep` off and :func:`replayed` on.
    """

    __slots__ = ("op", "replay", "values")

    def __init__(self) -> None:
        self.op = 0
        self.replay = False
        self.values: dict[int, dict[nn.Module, list[Any]]] = {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def drop(self, op: int) -> None:
        """Free slot ``op`` (its rebuild is done)."""
        self.values.pop(op, None)


_CURRENT: ContextVar[Record | None] = ContextVar("idm3d_record", default=None)


@contextmanager
def recording(record: Record | None) -> Iterator[None]:
    """Within the block, :func:`keep` and :func:`replayed` act on ``record`` (``None``: on nothing)."""
    token = _CURRENT.set(record)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def keep(module: nn.Module, value: Any) -> None:
    """In a segment node's forward, keep ``value`` (what ``module`` computed with a collective) for its rebuild."""
    record = _CURRENT.get()
    if record is not None and not record.replay:
        record.values.setdefault(record.op, {}).setdefault(module, []).append(value)


def replayed(module: nn.Module) -> Any | None:
    """In a segment node's rebuild, the value ``module`` kept at forward; ``None``: compute it as usual."""
    record = _CURRENT.get()
    if record is None or not record.replay:
        return None
    values = record.values.get(record.op, {}).get(module)
    return values[0] if values is not None and len(values) == 1 else None
