"""Graceful stop: a signal ends training after the current step, with a checkpoint, and exit code 75.

Clusters stop jobs with a signal and a grace period: SLURM sends SIGTERM (or, with ``--signal=USR1@90``,
SIGUSR1 ninety seconds before the time limit), Kubernetes SIGTERM and ``terminationGracePeriodSeconds``
later SIGKILL. :class:`StopSignals` turns the signals named in ``train.stop_signals`` into a flag; the
trainer looks at it after every step, writes a checkpoint at that step and raises :class:`TrainingStopped`,
which ``idm3d train`` reports on one line and exits with :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL`` of
``sysexits.h``: "try again later"), so a job script can tell "stopped, requeue me" from "finished" (0) and
"fix something" (2).

Under DDP every process takes the flag to the same all-reduce (a MAX over one number) after each step, so
all of them stop after the same step even when only one was signalled, and none is left waiting in a
collective. The all-reduce moves 8 bytes per step; a 3D training step takes 0.1 s to seconds.

A second SIGINT interrupts at once (``KeyboardInterrupt``): Ctrl-C twice still means "now". Repeats of
the other signals are ignored, and so is a SIGINT within :data:`REPEAT_WINDOW_S` of the first: Ctrl-C
reaches torchrun and its workers together and torchrun forwards it to the workers, so each worker sees
one keypress twice within milliseconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

__all__ = ["EXIT_STOPPED", "REPEAT_WINDOW_S", "StopSignals", "TrainingStopped"]

EXIT_STOPPED = 75  # EX_TEMPFAIL: the run is incomplete but intact; rerun the same command to continue
REPEAT_WINDOW_S = 1.0  # a SIGINT this soon after the first is the same keypress, forwarded


class TrainingStopped(Exception):
    """Training stopped on a signal after ``step``, with a checkpoint at ``checkpoint``.

    Args:
        signal_name: e.g. ``"SIGTERM"`` (the first one this process received; ``"a peer's signal"`` for a
            DDP process that stopped because another one was signalled).
        step: the number of steps done, and the checkpoint's step.
        checkpoint: the checkpoint's state JSON.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} written; "
                         "run the same command with --resume auto to continue")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class _Processes(Protocol):
    enabled: bool

    def max(self, values: Sequence[float]) -> list[float]: ...


class StopSignals:
    """While entered, the named signals set :attr:`requested` instead of ending the process.

    Outside the main thread (where Python cannot install handlers) it does nothing and never requests a
    stop, so a Trainer run from a worker thread behaves as before.

    Args:
        names: signal names without the ``SIG`` prefix (``train.stop_signals``), e.g. ``["TERM", "INT"]``.
        announce: print one line when the first signal arrives (rank 0 only, so DDP prints it once).
    """

    def __init__(self, names: Sequence[str], announce: bool = True) -> None:
        self.signals = [getattr(signal, f"SIG{n}") for n in names if hasattr(signal, f"SIG{n}")]
        self.announce = announce
        self.received: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A stop signal arrived in this process."""
        return self.received is not None

    def agreed(self, processes: _Processes) -> bool:
        """Whether any process got a stop signal (a :class:`~idm3d.training.distributed.DistContext`).

        Called by every process after every step: one all-reduce, so all of them stop after the same step.
        """
        if not processes.enabled:
            return self.requested
        return processes.max([float(self.requested)])[0] > 0

    def stopped(self, step: int, checkpoint: Path) -> TrainingStopped:
        """The exception that ends a run stopped after ``step`` with ``checkpoint`` written."""
        return TrainingStopped(self.received or "another process's signal", step, checkpoint)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > REPEAT_WINDOW_S:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
            return
        self.received, self._first_at = name, time.monotonic()
        if self.announce:
            # os.write, not print: the handler may run in the middle of another write to stderr.
            again = "; Ctrl-C again to interrupt at once" if signum == signal.SIGINT else ""
            os.write(2, f"idm3d: {name}: stopping after the current step with a checkpoint{again}\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
