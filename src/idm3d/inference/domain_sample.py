"""Depth-sharded (domain-parallel) sampling: one volume's chain split along depth across the ranks.

``torchrun --nproc_per_node R -m idm3d sample --run RUN --out OUT ... --domain-parallel R``.

Every rank loads the run and reads the inputs whole; :func:`shard_run` gives it a run whose pipeline
(:class:`DepthShardedPipeline`) keeps only the rank's ``D / R`` depth slices of ``x_t``, of the
condition and of the noise, runs the pipeline's own chain (DDPM, DDIM, or a flow run's Euler/Heun) on
them with a depth-sharded copy of the network (:class:`idm3d.domain.lean.LeanShardedNet`: the run's
parameters in halo convolutions, sharded GroupNorms and attentions, run in place), and all-gathers the result; rank 0
writes the files exactly as one process does (:func:`write_sample_sharded`).

The result does not depend on ``R``: every rank draws the *whole* volume's noise from the chain's seeded
generator and keeps its slices, at the start and in every stochastic step (DDPM, DDIM with ``eta > 0``),
so each voxel sees the very numbers one process draws (a draw costs far less than a network call; the
whole draw lives only until its slices are copied, one volume of float32 per draw). The steps themselves are
elementwise, and a flow run's time grid is made for the whole volume's size.

Not supported (one-line ``ConfigError``): patch-wise sampling (``sample.roi_size``), coordinate channels,
batch sampling (``--input-dir``/``--num``). Each rank runs the single-process network's lean no-grad
in-place path on its slices (:class:`idm3d.domain.lean.LeanShardedNet`: the slab path's GroupNorm
statistics combined over the ranks, the planes beyond a shard's ends swapped with the neighbours), so a
rank's peak shrinks with its share of the volume (docs/bench/domain-lean-128.md).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.overrides import TorchFunctionMode

from idm3d.diffusion.flow import is_flow
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.diffusion.solvers import FlowSolver
from idm3d.domain.comm import Domain, gather_depth, local_slices
from idm3d.domain.lean import LeanShardedNet
from idm3d.errors import ArgumentError, ConfigError
from idm3d.inference.generate import write_sample
from idm3d.runs.load import LoadedRun
from idm3d.runs.model_factory import size_multiple

__all__ = ["DepthShardedPipeline", "check_domain_depth", "shard_run", "write_sample_sharded"]

OPTION = "--domain-parallel"


def check_domain_depth(depth: int, ranks: int, multiple: int) -> None:
    """Raise the one-line error for a volume depth that ``ranks`` shards of the network cannot split.

    Args:
        depth: the volume's depth (its first spatial axis).
        ranks: ``R``.
        multiple: the network's size multiple, ``2 ** (levels - 1)``.
    """
    if depth % (ranks * multiple):
        raise ConfigError(
            f"{OPTION} {ranks}: the volume's depth {depth} (its first axis) must be a multiple of {ranks * multiple} "
            f"= {ranks} ranks x 2 ** (levels - 1) = {multiple} (each rank's slices must split at every level)"
        )


class _WholeVolumeDraws(TorchFunctionMode):
    """Inside a scheduler step: a volume's noise drawn from ``generator`` is the whole volume's draw, sliced.

    MONAI's DDPM/DDIM steps draw ``torch.randn(model_output.shape, generator=...)``; on a shard that shape
    is the rank's, which would give other numbers than one process. Here the whole volume's shape is drawn
    (the same numbers, the generator left where one process leaves it) and the rank's slices returned.
    Any other draw from the generator is refused rather than silently differing.
    """

    def __init__(self, generator: torch.Generator, domain: Domain) -> None:
        super().__init__()
        self.generator, self.domain = generator, domain

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("generator") is not self.generator:
            return func(*args, **kwargs)
        sizes = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
        if func is not torch.randn or len(sizes) != 5:
            name = getattr(func, "__name__", func)
            raise RuntimeError(f"depth-sharded sampling: the scheduler drew {name}{sizes} from the chain's generator; "
                               "only whole-volume torch.randn draws can be split")
        whole = torch.randn((*sizes[:2], sizes[2] * self.domain.size, *sizes[3:]), **kwargs)
        return local_slices(whole, self.domain).contiguous()


class _WholeGridSolver(FlowSolver):
    """A flow solver whose time grid is the whole volume's (MONAI's warp depends on the volume's size)."""

    def __init__(self, solver: FlowSolver, ranks: int) -> None:
        self.__dict__.update(solver.__dict__)  # a copy of the solver's settings; the schedule object is shared
        self.ranks = ranks

    def grid(self, spatial: Sequence[int]) -> list[float]:
        """The step boundaries for the whole volume of which ``spatial`` is one rank's shard."""
        return super().grid((int(spatial[0]) * self.ranks, *spatial[1:]))


def _sharded_scheduler(scheduler: Any, generator: torch.Generator, domain: Domain) -> Any:
    """A copy of ``scheduler`` whose steps draw the whole volume's noise (a flow solver: its whole grid)."""
    if isinstance(scheduler, FlowSolver):
        return _WholeGridSolver(scheduler, domain.size)
    if is_flow(scheduler):
        return scheduler  # a bare RFlowScheduler: the pipeline refuses it with its own one line
    twin = copy.copy(scheduler)  # shares the schedule's tensors; the caller's scheduler stays untouched
    step = scheduler.step

    def sharded_step(*args: Any, **kwargs: Any) -> Any:
        with _WholeVolumeDraws(generator, domain):
            return step(*args, **kwargs)

    twin.step = sharded_step
    return twin


class DepthShardedPipeline(DiffusionPipeline):
    """A run's pipeline over a depth-sharded network: :meth:`sample` takes and returns whole volumes.

    Args:
        pipeline: the single-process pipeline (scheduler, loss, autocast are taken from it).
        group: the domain's process group (``None``: the world); every rank of it calls :meth:`sample`
            with the same arguments.

    Raises:
        ConfigError: patch-wise sampling or coordinate channels (neither is split by depth).
    """

    def __init__(self, pipeline: DiffusionPipeline, group: Any = None) -> None:
        if pipeline.roi_size is not None:
            raise ConfigError(f"sample.roi_size: patch-wise sampling is not supported with {OPTION}; set it to null")
        if pipeline.coordinates:
            raise ConfigError(f"data.patch.coordinates: coordinate channels are not supported with {OPTION}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(f"{OPTION}: no process group; run under torchrun --nproc_per_node R")
        if not isinstance(pipeline.model, torch.nn.Module):
            raise ArgumentError("pipeline", "depth sharding needs a network (an nn.Module), not a function")
        super().__init__(LeanShardedNet(pipeline.model, group), pipeline.scheduler, loss=pipeline.loss_kind,
                         ssim_weight=pipeline.ssim_weight, overlap=pipeline.overlap, autocast=pipeline.autocast)
        self.group = group
        self.domain = Domain.of(group)
        self.multiple = size_multiple(pipeline.model)

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        condition: Tensor | None = None,
        *,
        scheduler: Any = None,
        generator: torch.Generator | None = None,
        x_start: Tensor | None = None,
        noise: Tensor | None = None,
        position: Tensor | None = None,
        progress: bool = False,
        **options: Any,
    ) -> Tensor:
        """:meth:`DiffusionPipeline.sample` of the whole ``shape``, each rank running its depth slices.

        The arguments are the single-process ones (``options``: ``start_timestep``, ``eta``, ``device``),
        whole volumes on every rank; ``generator`` is required (every rank draws the same noise from it)
        and ``position`` refused. Returns the whole volume on every rank (float32, on the chain's device);
        only rank 0 shows progress.
        """
        if generator is None:
            raise ArgumentError("generator", "depth-sharded sampling needs a seeded torch.Generator (every rank "
                                "draws the same whole-volume noise from it)")
        if position is not None:
            raise ArgumentError("position", "coordinate channels are not supported by depth-sharded sampling")
        shape = tuple(int(s) for s in shape)
        check_domain_depth(shape[2], self.domain.size, self.multiple)
        if noise is None:  # the single-process draw (DiffusionPipeline.sample / FlowChainMixin), kept whole
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ArgumentError("noise", f"shape {tuple(noise.shape)} is not the sample shape {shape}")

        def mine(t: Tensor | None) -> Tensor | None:
            return None if t is None else local_slices(t, self.domain).contiguous()

        local = (*shape[:2], shape[2] // self.domain.size, *shape[3:])
        scheduler = self.scheduler if scheduler is None else scheduler
        out = super().sample(
            local, mine(condition), scheduler=_sharded_scheduler(scheduler, generator, self.domain),
            generator=generator, x_start=mine(x_start), progress=progress and self.domain.rank == 0, noise=mine(noise),
            **options,
        )
        return gather_depth(out, self.group)


def shard_run(run: LoadedRun, group: Any = None) -> LoadedRun:
    """``run`` with a :class:`DepthShardedPipeline`: its :meth:`~LoadedRun.infer` splits each chain by depth.

    ``run`` itself is unchanged (the sharded twin shares its parameters), so the two can be used side by side.
    Every rank of ``group`` must make the same calls on the returned run.
    """
    return dataclasses.replace(run, pipeline=DepthShardedPipeline(run.pipeline, group))


def write_sample_sharded(
    run: LoadedRun,
    out: str | Path,
    conditions: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    *,
    group: Any = None,
    **options: Any,
) -> list[Path]:
    """:func:`~idm3d.inference.generate.write_sample` with the chain split by depth over ``group``.

    Call it on every rank with the same arguments (``options``: ``write_sample``'s ``shape``, ``seed``,
    ``progress``, ``png``); each reads the inputs and runs its slices, and rank 0 writes the files (the same
    header, affine and format as one process). Returns the paths on every rank.
    """
    return write_sample(shard_run(run, group), out, conditions, save=Domain.of(group).rank == 0, **options)
