"""The training clock and what the progress bar says about the budget (steps and/or seconds)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

__all__ = ["Clock", "budget_postfix", "format_seconds"]


@dataclasses.dataclass
class Clock:
    """Training time of this session on top of what earlier sessions used, and the logging window.

    Two clocks: wall time, and this process's CPU time (``time.process_time``, all its threads), which
    other processes on the machine do not change - a budget in CPU seconds buys the same work on a busy
    machine as on an idle one.
    """

    base: float
    cpu_base: float = 0.0
    started: float = dataclasses.field(default_factory=time.monotonic)
    cpu_started: float = dataclasses.field(default_factory=time.process_time)
    window_start: float = dataclasses.field(default_factory=time.monotonic)
    window_steps: int = 0
    session_steps: int = 0

    def elapsed(self) -> float:
        return self.base + (time.monotonic() - self.started)

    def cpu_elapsed(self) -> float:
        return self.cpu_base + (time.process_time() - self.cpu_started)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (TensorBoard previews): the budget and the rates skip it."""
        t0, c0 = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            dt = time.monotonic() - t0
            self.started += dt
            self.window_start += dt
            self.cpu_started += time.process_time() - c0

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

    def cpu_per_wall(self) -> float:
        """CPU seconds per wall second over this session (about the thread count on an idle machine)."""
        wall = time.monotonic() - self.started
        cpu = time.process_time() - self.cpu_started
        return cpu / wall if wall > 0 and cpu > 0 else 1.0

    def postfix(
        self, step: int, max_steps: int | None, max_seconds: float | None, max_cpu_seconds: float | None
    ) -> dict[str, str]:
        """The progress bar's budget fields: a CPU-time budget when set, else the wall-time one."""
        if max_cpu_seconds is None:
            return budget_postfix(self.elapsed(), max_seconds, step, max_steps, self.session_rate())
        per_wall = self.cpu_per_wall()
        return budget_postfix(self.cpu_elapsed(), max_cpu_seconds, step, max_steps, self.session_rate() / per_wall,
                              label="cpu", wall_per_second=1.0 / per_wall)


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def budget_postfix(
    elapsed: float, max_seconds: float | None, step: int, max_steps: int | None, rate: float,
    *, label: str = "time", wall_per_second: float = 1.0,
) -> dict[str, str]:
    """Progress-bar fields of a time-budgeted run: ``time`` used / budget and the ``eta`` of whichever ends first.

    Empty without ``max_seconds`` (tqdm's own step ETA then says it all). The step ETA extrapolates
    ``rate`` (steps per budget second of this session); before any step it is unknown and only the
    time left counts. A CPU-time budget passes ``label="cpu"`` and the wall seconds per CPU second, so
    the ETA is still in wall time.
    """
    if max_seconds is None:
        return {}
    left = max(0.0, max_seconds - elapsed)
    if max_steps is not None and rate > 0:
        left = min(left, max(0, max_steps - step) / rate)
    elif max_steps is not None and step >= max_steps:
        left = 0.0
    return {label: f"{format_seconds(elapsed)}/{format_seconds(max_seconds)}",
            "eta": format_seconds(left * wall_per_second)}
