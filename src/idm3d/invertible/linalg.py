"""Batched ``solve`` and ``log|det|`` that stay correct on multi-threaded CPUs.

PyTorch's CPU batched LU (behind ``linalg.solve``, ``lu_factor``, ``inv``, ``slogdet``) hands the
matrices of a batch to several threads at once whenever the matrices are larger than ~14 (its
grain-size heuristic truncates to 0), and MKL's ``getrf`` called that way fails for matrices above
~150: an "Intel oneMKL ERROR ... SLASWP" message followed by a ``RuntimeError``, a hang, or
silently wrong values (pytorch/pytorch#142815; fix proposed in PR #181570, not merged in 2.13).
A batch of one, or any batch with one intra-op thread, takes the serial path, which is correct.

So on CPU, with more than one thread and more than one matrix, the batched call runs with one
intra-op thread for its duration (rather than one matrix at a time, or a QR + triangular solve,
which keep MKL's own threads and let them spin when the cores are shared); its cost in a training
step is what ``python -m benchmarks.attention`` reports.
Other devices (CUDA) take the batched call unchanged. The backward passes of both functions use
the saved LU factors through ``lu_solve``, which has no such fault (checked batched, 2 threads).

``torch.set_num_threads`` is process-wide: a lock serialises the switch so that two Python threads
solving at once restore the count correctly; torch work in *other* threads meanwhile runs with one
thread (slower, never wrong).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["logabsdet", "serial_lapack", "solve"]

_LOCK = threading.RLock()


def _batched(a: Tensor) -> bool:
    return a.dim() > 2 and a.shape[:-2].numel() > 1


@contextmanager
def serial_lapack(a: Tensor) -> Iterator[None]:
    """Run the enclosed batched LAPACK call on one intra-op thread when ``a`` needs it (CPU, batch > 1)."""
    if a.device.type != "cpu" or not _batched(a) or torch.get_num_threads() == 1:
        yield
        return
    with _LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _guarded(op: Callable[[], Tensor], a: Tensor) -> Tensor:
    with serial_lapack(a):
        return op()


def solve(a: Tensor, b: Tensor) -> Tensor:
    """``torch.linalg.solve(a, b)`` (``a`` of shape (..., n, n), ``b`` of (..., n, k)), safe on any thread count."""
    return _guarded(lambda: torch.linalg.solve(a, b), a)


def logabsdet(a: Tensor) -> Tensor:
    """``torch.linalg.slogdet(a).logabsdet`` for (..., n, n), safe on any thread count."""
    return _guarded(lambda: torch.linalg.slogdet(a).logabsdet, a)
