"""Depth-sharded (domain-parallel) training.

``torchrun --nproc_per_node R -m idm3d train --set train.domain_parallel=R`` (or ``idm3d train --nproc R``).

Every rank draws the whole global batch (the same seeded patches, noise and timesteps as one process)
and keeps its depth slices; the training forward runs through a sharded twin of the model that shares
its parameters (:func:`idm3d.domain.twin.sharded_twin`), and each rank's loss is the mean over its
slices, so the mean over ranks is the single process's loss and the averaged gradients its gradient.
The model itself stays whole on every rank: rank 0 writes the checkpoints, the EMA and previews
see full weights, and ``idm3d sample`` loads the run as any other.

Not supported yet (each refused with a one-line ConfigError): combining with data parallelism (the
world must be exactly ``R`` processes), coordinate channels and the SSIM loss (both span the volume),
patch-size schedules (each size would need a depth the ranks split evenly).
The drift guard checks each rank's slices with the unsharded model (the same weights' rebuild on a
smaller volume).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from idm3d.domain.comm import scatter_depth
from idm3d.domain.twin import sharded_twin
from idm3d.errors import ConfigError
from idm3d.runs.config import Config
from idm3d.training.distributed import DistContext

__all__ = ["DomainContext", "domain_context"]


@dataclass(frozen=True)
class DomainContext(DistContext):
    """A :class:`DistContext` whose processes split each volume along depth instead of splitting the batch."""

    patch_depth: int = 0

    def check_batch(self, batch_size: int, option: str = "data.batch_size") -> None:
        """Every rank takes the whole batch: any size works."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The sharded twin of ``model`` (the training forward goes through it)."""
        multiple = self.world_size * getattr(model, "size_multiple", 1)
        if self.patch_depth % multiple:
            raise ConfigError(
                f"data.patch_size: the depth {self.patch_depth} is split over train.domain_parallel="
                f"{self.world_size} ranks and must be a multiple of {multiple} (ranks x 2 ** (levels - 1))"
            )
        return sharded_twin(model)

    def shard(self, x: Tensor | None) -> Tensor | None:
        """This rank's depth slices of a (B, C, D, H, W) batch; per-sample values stay whole."""
        if x is None or x.dim() != 5:
            return x
        return scatter_depth(x)


def domain_context(ctx: DistContext, cfg: Config) -> DistContext:
    """``ctx`` as a :class:`DomainContext` when ``train.domain_parallel`` > 1 (checked against the config)."""
    ranks = cfg.train.domain_parallel
    if ranks == 1:
        return ctx
    if ctx.world_size != ranks:
        raise ConfigError(
            f"train.domain_parallel: {ranks} needs exactly {ranks} processes (torchrun --nproc_per_node {ranks}), "
            f"got {ctx.world_size}; domain and data parallelism together are not supported yet"
        )
    if cfg.data.patch.coordinates:
        raise ConfigError(
            "data.patch.coordinates: coordinate channels are not supported with train.domain_parallel > 1"
        )
    if cfg.data.patch.schedule != "fixed":
        raise ConfigError("data.patch.schedule: only 'fixed' (one patch size) works with train.domain_parallel > 1")
    if cfg.diffusion.ssim_weight:
        raise ConfigError("diffusion.ssim_weight: the SSIM loss is not supported with train.domain_parallel > 1")
    return DomainContext(ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, patch_depth=cfg.data.patch_size[0])
