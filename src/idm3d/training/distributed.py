"""Data-parallel training over several processes: ``torchrun --nproc_per_node N -m idm3d train ...``.

Each process holds a full copy of the model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`
(DDP); gradients are averaged across processes by DDP's hooks on every parameter's gradient
accumulator. The memory-efficient backward (:mod:`idm3d.invertible.segment`) passes every parameter to
its autograd Function as an explicit input and returns its gradient, so each parameter's accumulator
runs once per backward and DDP all-reduces it exactly once, with no ``find_unused_parameters``.

Data: the global batch of step ``s`` (``data.batch_size`` patches with their noise and timesteps, all
drawn from ``(train.seed, s)``) is the same on every process; process ``r`` of ``N`` trains on the
``r``-th contiguous ``1/N`` of it. A run therefore sees the same data whatever ``N`` is, and resuming at
step ``s`` (with any ``N``) continues the data order exactly. Each process takes the mean loss over its
share and DDP averages the gradients, which is the gradient of the mean over the global batch.

Only rank 0 writes to the run folder (config, split, checkpoints, metrics, the loss curve) and shows the
progress bar; every process resumes from the same checkpoint. The outcome of rank 0's checkpoint write is
agreed (:meth:`DistContext.agreed_outcome`): a full disk there stops every process with the same line.
Every process prepares the data itself (:class:`~idm3d.runs.data_source.DataSource` writes nothing, and
the split depends only on the case ids and ``data.split_seed``), so no process waits for another to write a
file.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from idm3d.errors import ConfigError, IDM3DError
from idm3d.runs.load import resolve_device

__all__ = ["DistContext", "NullLog", "launcher_argv", "setup", "shutdown"]

T = TypeVar("T")
_OWNED = False  # whether setup() created the process group (and shutdown() should destroy it)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DDP when distributed, else ``model`` itself (the training forward goes through this)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def check_batch(self, batch_size: int, option: str = "data.batch_size") -> None:
        """The global batch must split evenly (equal shares keep the averaged gradient the global mean)."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"{option}: the global batch is split across {self.world_size} processes and must be a multiple "
                f"of {self.world_size}, got {batch_size}"
            )

    def shard(self, x: Tensor | None) -> Tensor | None:
        """This process's contiguous share of a global batch (dimension 0)."""
        if x is None or not self.enabled:
            return x
        per = x.shape[0] // self.world_size
        return x[self.rank * per : (self.rank + 1) * per]

    def _tensor(self, values: Sequence[float]) -> Tensor:
        # NCCL only reduces CUDA tensors; gloo takes CPU ones.
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def mean(self, value: float) -> float:
        """Mean of ``value`` over processes (NaN anywhere gives NaN everywhere)."""
        if not self.enabled:
            return value
        t = self._tensor([value])
        dist.all_reduce(t)
        return float(t[0]) / self.world_size

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over processes (every process must pass the same number of values)."""
        if not self.enabled or not values:
            return list(values)
        t = self._tensor(values)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every process (decisions taken on a local clock must not diverge)."""
        if not self.enabled:
            return flag
        t = self._tensor([float(flag)])
        dist.broadcast(t, src=0)
        return bool(t[0])

    @contextlib.contextmanager
    def agreed_outcome(self) -> Iterator[None]:
        """Run a block that not every process does the same in (rank 0's checkpoint write) and agree on its end.

        After the block every process all-reduces a failure flag: when no process failed, all go on; when
        one did, it raises its own error and every other process raises the same one-line error (an
        :class:`~idm3d.errors.IDM3DError` keeps its type: a full disk on rank 0 is a
        :class:`~idm3d.runs.rundir.RunWriteError` on every rank), so all stop together instead of the others
        training on into a collective that the failed process never joins. Costs one all-reduce of one
        number when nothing failed. ``KeyboardInterrupt`` and ``SystemExit`` pass through unagreed.
        """
        if not self.enabled:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as err:
            error = err
        # The lowest rank that failed, or world_size when none did.
        t = self._tensor([self.rank if error is not None else self.world_size])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first = int(t[0])
        if first == self.world_size:
            return
        box: list[Any] = [None]
        if self.rank == first:
            assert error is not None
            line = (str(error).strip().splitlines() or [""])[0]
            # Sent as (class, line): an IDM3DError subclass is rebuilt from its message; anything else (a bug
            # keeps its traceback on the process where it happened) becomes one IDM3DError line elsewhere.
            box[0] = ((type(error), line) if isinstance(error, IDM3DError)
                      else (IDM3DError, f"process {first}: {type(error).__name__}: {line}"))
        dist.broadcast_object_list(box, src=first)
        dist.barrier()  # every process holds the line before the failed one exits (torchrun then ends the rest)
        if error is not None:
            raise error
        kind, line = box[0]
        raise kind(line)

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class NullLog:
    """Stands in for :class:`~idm3d.runs.logs.MetricsLog` on ranks other than 0 (which write nothing)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer (set by torchrun), got {raw!r}") from None


def _device(option: str, local_rank: int, world_size: int) -> torch.device:
    """Process ``local_rank``'s device: ``auto``/``cuda`` -> ``cuda:<local_rank>`` (else CPU)."""
    if world_size == 1:
        return resolve_device(option)
    if option == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = resolve_device("cuda" if option == "auto" else option)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"train.device: with {world_size} processes each one uses cuda:<LOCAL_RANK>; "
                          f"set auto or cuda, got {option!r}")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"train.device: process LOCAL_RANK={local_rank} needs cuda:{local_rank} but only "
                          f"{torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", local_rank)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """torchrun's store, under a prefix of this restart (``TORCHELASTIC_RESTART_COUNT``).

    torchrun keeps one store server for all restarts of a job and the workers' keys carry no round, so
    after ``--max-restarts`` restarted a worker group, a new process could read a dead process's address
    from the previous attempt and fail ``init_process_group`` ("Gloo connectFullMesh failed ...
    Connection refused"). One prefix per attempt gives every attempt keys of its own.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    return dist.PrefixStore(f"idm3d/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup(device: str = "auto") -> DistContext:
    """This process's :class:`DistContext`, creating the process group from torchrun's environment if needed.

    An already initialised group (e.g. made by a test or a notebook) is used as it is. Otherwise, when
    ``WORLD_SIZE`` > 1 (``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set by torchrun), the
    group is created: backend ``nccl`` on CUDA, ``gloo`` on CPU. Without torchrun: a single process.

    Args:
        device: the ``train.device`` option.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = _device(device, local, world)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local, dev)
    world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world <= 1:
        return DistContext(device=resolve_device(device))
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    dev = _device(device, local, world)
    store = _attempt_store(rank, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl", device_id=dev, store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world)
    _OWNED = True
    return DistContext(rank, world, local, dev)


def shutdown(clean: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it.

    Args:
        clean: meet the other processes at a barrier first (a normal end). After an error other
            processes may be inside another collective, so no barrier is attempted.
    """
    global _OWNED
    if _OWNED and dist.is_initialized():
        # collect cycles now: a gloo work or DDP reducer still alive at interpreter exit is torn down without
        # the GIL's owner (a rare SIGABRT, pytorch#179291)
        gc.collect()
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _OWNED = False


def launcher_argv(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that reruns ``idm3d <argv>`` in ``nproc`` processes through torchrun's module.

    ``--standalone`` picks a free local rendezvous port, so parallel runs on one machine do not collide.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc: expected an integer >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "idm3d", *argv]
