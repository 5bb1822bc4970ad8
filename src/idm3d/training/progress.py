"""The training clock and what the progress bar says about the budget (steps and/or seconds)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

__all__ = ["Clock", "budget_postfix", "format_seconds"]


@dataclasses.dataclass
class Clock:
    """Training time of this session on top of what earlier sessions used, and the logging window."""

    base: float
    started: float = dataclasses.field(default_factory=time.monotonic)
    window_start: float = dataclasses.field(default_factory=time.monotonic)
    window_steps: int = 0
    session_steps: int = 0

    def elapsed(self) -> float:
        return self.base + (time.monotonic() - self.started)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (TensorBoard previews): the budget and the rates skip it."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            dt = time.monotonic() - t0
            self.started += dt
            self.window_start += dt

    def tick(self) -> None:
        self.window_steps += 1
        self.session_steps += 1

    def steps_per_s(self) -> float:
        """Steps per second since the last call (the logging window), and start a new window."""
        now = time.monotonic()
        rate = self.window_steps / max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, 0
        return rate

    def session_rate(self) -> float:
        """Steps per second over this session (what the ETA extrapolates)."""
        return self.session_steps / max(time.monotonic() - self.started, 1e-9)


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def budget_postfix(
    elapsed: float, max_seconds: float | None, step: int, max_steps: int | None, rate: float
) -> dict[str, str]:
    """Progress-bar fields of a time-budgeted run: ``time`` used / budget and the ``eta`` of whichever ends first.

    Empty without ``max_seconds`` (tqdm's own step ETA then says it all). The step ETA extrapolates
    ``rate`` (steps/s of this session); before any step it is unknown and only the time left counts.
    """
    if max_seconds is None:
        return {}
    left = max(0.0, max_seconds - elapsed)
    if max_steps is not None and rate > 0:
        left = min(left, max(0, max_steps - step) / rate)
    elif max_steps is not None and step >= max_steps:
        left = 0.0
    return {"time": f"{format_seconds(elapsed)}/{format_seconds(max_seconds)}", "eta": format_seconds(left)}
