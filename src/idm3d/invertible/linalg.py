"""Batched ``solve`` and ``log|det|`` that stay correct on multi-threaded CPUs.

PyTorch's CPU batched LU (behind ``linalg.solve``, ``lu_factor``, ``inv``, ``slogdet``) hands the
matrices of a batch to several threads at once whenever the matrices are larger than ~14 (its
grain-size heuristic truncates to 0), and MKL's ``getrf`` called that way fails for matrices above
~150: an "Intel oneMKL ERROR ... SLASWP" message followed by a ``RuntimeError``, a hang, or
silently wrong values (pytorch/pytorch#142815; fix proposed in PR #181570, not merged in 2.13).
A batch of one, or any batch with one intra-op thread, takes the serial path, which is correct.

So on CPU, with more than one thread and more than one matrix, the batched call runs with one
intra-op thread for its duration. The options, timed on the 2-core CI machine while it was shared
(torch 2.13.0+cpu, fp32, a batch of 2 256x256 matrices with 256 right-hand sides, ``time.perf_counter``
over 10 calls after one warm-up): batched with 1 thread 2.4 ms, one matrix at a time with 1 thread
3.5 ms, one at a time with 2 threads 609 ms (MKL's own threads spin while the other core is busy),
QR + triangular solve with 2 threads 1068 ms; a ``set_num_threads`` pair costs < 1 us. In a training
step the switch is not measurable: ``python -m benchmarks.attention --sizes 8 --spatial-sizes 8 --channels 256
--batch 2 --depth 2 --threads 1`` gives the same memory-efficient step time (within the machine's
noise) with and without this module, and with ``--threads 2`` the memory-efficient step, which timed
out without it (> 60 s), takes 1.4-1.5x the plain-autograd step.
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
