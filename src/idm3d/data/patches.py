"""Random patches of aligned multi-channel volumes, reproducible from a seed and a step number.

Source and target modalities are channels of one (C, X, Y, Z) tensor, so one crop keeps them aligned.
Each training step ``s`` draws from a ``torch.Generator`` seeded by ``(seed, s)``: a run resumed at step
``s`` sees exactly the patches it would have seen without the interruption, whatever happened before.

Errors are ``ValueError`` naming this module's own arguments (``patch_size``, ``batch_size``...); the
training layer names the config key (``data.patch_size``).

With a :class:`~idm3d.data.patch_schedule.PatchSchedule` the patch size changes from step to step
(one size per batch); every batch also says where its patches lie (``position``: corner and volume
shape), from which the diffusion layer builds the coordinate channels.

Whole-volume inference is left to :func:`monai.inferers.sliding_window_inference` (or a single pass
when the volume fits), which needs nothing from this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from idm3d.data.patch_schedule import PatchSchedule
from idm3d.errors import ArgumentError

__all__ = ["PatchSampler", "crop", "foreground_box", "generator_for_step", "sample_corner", "sample_patch"]

Region = Sequence[tuple[int, int] | None]
Box = tuple[tuple[int, int], ...]


def generator_for_step(seed: int, step: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, step)`` (mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _bounds(shape: Sequence[int], patch: Sequence[int], region: Region | None) -> list[tuple[int, int]]:
    if len(patch) != len(shape):
        raise ArgumentError("patch_size", f"expected {len(shape)} sizes, got {tuple(patch)}")
    region = list(region) if region is not None else [None] * len(shape)
    bounds = []
    for axis, (size, p, r) in enumerate(zip(shape, patch, region)):
        lo, hi = (0, size) if r is None else (max(0, int(r[0])), min(size, int(r[1])))
        if p < 1 or p > hi - lo:
            raise ArgumentError(
                "patch_size", f"{p} voxels along axis {axis} does not fit the allowed extent {lo}..{hi} "
                f"(volume size {size})"
            )
        bounds.append((lo, hi))
    return bounds


def sample_corner(
    shape: Sequence[int],
    patch_size: Sequence[int],
    generator: torch.Generator,
    *,
    mask: torch.Tensor | None = None,
    foreground_prob: float = 0.0,
    region: Region | None = None,
    box: Box | None = None,
) -> tuple[int, ...]:
    """Lowest corner of a random patch that lies inside the volume (and ``region``).

    Args:
        shape: spatial shape (X, Y, Z).
        patch_size: patch size per axis.
        generator: source of randomness (the only one used).
        mask: spatial or (1, X, Y, Z) bool mask; with probability ``foreground_prob`` the patch is centred on
            a uniformly drawn mask voxel inside ``region`` (then shifted to fit), otherwise uniform.
        foreground_prob: probability of a foreground-centred patch.
        region: per axis ``(start, stop)`` or None; the whole patch stays inside, e.g. training slabs only.
        box: :func:`foreground_box` of ``mask`` in ``region`` if already known (None: computed here).
    """
    bounds = _bounds(shape, patch_size, region)
    # Both random numbers are always drawn so the generator advances the same way on both branches.
    coin = torch.rand((), generator=generator).item()
    uniform = [int(torch.randint(lo, hi - p + 1, (), generator=generator)) for (lo, hi), p in zip(bounds, patch_size)]
    if mask is None or coin >= foreground_prob:
        return tuple(uniform)
    m = mask[0] if mask.ndim == 4 else mask
    box = box or foreground_box(m, region)
    if box is None:  # no mask voxel inside the region
        return tuple(uniform)
    centre = _foreground_voxel(m, box, generator)
    return tuple(min(max(c - p // 2, lo), hi - p) for c, p, (lo, hi) in zip(centre, patch_size, bounds))


def foreground_box(mask: torch.Tensor, region: Region | None = None) -> Box | None:
    """Bounding box ``((start, stop),) * 3`` of the mask voxels inside ``region``; None when there are none."""
    m = mask[0] if mask.ndim == 4 else mask
    bounds = _bounds(m.shape, [1] * m.ndim, region)
    sub = m[tuple(slice(lo, hi) for lo, hi in bounds)].bool()
    if not bool(sub.any()):
        return None
    box = []
    for axis, (lo, _) in enumerate(bounds):
        others = tuple(a for a in range(sub.ndim) if a != axis)
        hit = torch.nonzero(sub.amax(dim=others)).flatten()
        box.append((lo + int(hit[0]), lo + int(hit[-1]) + 1))
    return tuple(box)


def _foreground_voxel(mask: torch.Tensor, box: Box, generator: torch.Generator, tries: int = 256) -> list[int]:
    # Rejection sampling inside the box is exactly uniform over its mask voxels and needs no (N, 3) index
    # per case (which would cost ~36 MB for a BraTS brain); a brain fills about half of its box.
    lo = torch.tensor([b[0] for b in box])
    size = torch.tensor([b[1] - b[0] for b in box])
    for _ in range(tries):
        point = lo + (torch.rand(len(box), generator=generator) * size).long().clamp_max(size - 1)
        if bool(mask[tuple(point.tolist())]):
            return point.tolist()
    # Sparse masks: draw from the explicit list instead (same distribution, more memory).
    index = torch.nonzero(mask[tuple(slice(a, b) for a, b in box)]) + lo
    return index[int(torch.randint(len(index), (), generator=generator))].tolist()


def crop(tensor: torch.Tensor, corner: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """``tensor[..., x:x+px, y:y+py, z:z+pz]`` for the last ``len(corner)`` axes."""
    index = tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
    return tensor[(Ellipsis, *index)]


def sample_patch(
    volume: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: Sequence[int],
    generator: torch.Generator,
    *,
    foreground_prob: float = 0.5,
    region: Region | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Crop one random patch from a (C, X, Y, Z) volume and its mask at the same place.

    Returns:
        ``(patch, mask_patch, corner)``; channels stay aligned because they are cropped together.
    """
    corner = sample_corner(
        volume.shape[1:], patch_size, generator, mask=mask, foreground_prob=foreground_prob, region=region
    )
    return crop(volume, corner, patch_size), (None if mask is None else crop(mask, corner, patch_size)), corner


class PatchSampler:
    """Batches of random patches from several cases, one generator per step.

    Args:
        volumes: (C, X, Y, Z) tensors, e.g. ``CaseRecord.image``.
        masks: matching (1, X, Y, Z) bool masks (or None entries).
        patch_size: patch size (X, Y, Z).
        batch_size: patches per batch; each draws its case uniformly.
        seed: run seed.
        foreground_prob: probability that a patch is centred inside the mask.
        regions: per case, the region patches must stay in (e.g. the demo's training slabs), or None.
        target_channels: if given, batches hold ``source`` (other channels) and ``target`` (these).
        schedule: patch sizes drawn per step (Patch Diffusion's mix); ``None``: always ``patch_size``.
    """

    def __init__(
        self,
        volumes: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor | None] | None,
        patch_size: Sequence[int],
        *,
        batch_size: int = 1,
        seed: int = 0,
        foreground_prob: float = 0.5,
        regions: Sequence[Region | None] | None = None,
        target_channels: Sequence[int] | None = None,
        schedule: PatchSchedule | None = None,
    ) -> None:
        if not volumes:
            raise ArgumentError("volumes", "no volumes to sample from")
        if batch_size < 1:
            raise ArgumentError("batch_size", f"expected >= 1, got {batch_size}")
        if not 0.0 <= foreground_prob <= 1.0:
            raise ArgumentError("foreground_prob", f"expected a probability in [0, 1], got {foreground_prob}")
        self.volumes = list(volumes)
        self.masks = list(masks) if masks is not None else [None] * len(self.volumes)
        self.regions = list(regions) if regions is not None else [None] * len(self.volumes)
        self.schedule = PatchSchedule.fixed(patch_size) if schedule is None else schedule
        self.patch_size = self.schedule.largest
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.foreground_prob = float(foreground_prob)
        self.target_channels = None if target_channels is None else [int(c) for c in target_channels]
        self.step = 0
        self._boxes: list[Box | None] = []
        for volume, mask, region in zip(self.volumes, self.masks, self.regions):
            _bounds(volume.shape[1:], self.patch_size, region)  # fail now, not at step 10 000
            self._boxes.append(None if mask is None else foreground_box(mask, region))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step``: ``image`` (B, C, *patch) or ``source``/``target``, ``mask``, ``case``, ``corner``,
        ``position`` (B, 2, 3: corner and the volume's shape)."""
        generator = generator_for_step(self.seed, step)
        # A fixed size draws nothing, so runs without a schedule see the patches they always saw.
        size = self.schedule.draw(generator) if len(self.schedule.sizes) > 1 else self.schedule.sizes[0]
        images, masks, cases, corners, extents = [], [], [], [], []
        for _ in range(self.batch_size):
            i = int(torch.randint(len(self.volumes), (), generator=generator))
            volume, mask = self.volumes[i], self.masks[i]
            corner = sample_corner(
                volume.shape[1:],
                size,
                generator,
                mask=mask,
                foreground_prob=self.foreground_prob,
                region=self.regions[i],
                box=self._boxes[i],
            )
            images.append(crop(volume, corner, size))
            masks.append(crop(mask, corner, size) if mask is not None else torch.ones((1, *size), dtype=torch.bool))
            cases.append(i)
            corners.append(corner)
            extents.append(tuple(volume.shape[1:]))
        corner_t = torch.tensor(corners)
        out = {"mask": torch.stack(masks), "case": torch.tensor(cases), "corner": corner_t,
               "position": torch.stack([corner_t, torch.tensor(extents)], dim=1)}
        image = torch.stack(images)
        if self.target_channels is None:
            out["image"] = image
        else:
            keep = [c for c in range(image.shape[1]) if c not in self.target_channels]
            out["source"], out["target"] = image[:, keep], image[:, self.target_channels]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the same patch sequence."""
        return {
            "seed": self.seed,
            "step": self.step,
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "foreground_prob": self.foreground_prob,
            "schedule": self.schedule.describe(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; the sampling options must match those of this sampler."""
        for key in ("patch_size", "batch_size", "foreground_prob", "schedule"):
            mine = (list(self.patch_size) if key == "patch_size" else self.schedule.describe() if key == "schedule"
                    else getattr(self, key))
            if key in state and state[key] != mine:
                raise ValueError(f"patch sampler state: {key} is {state[key]} in the checkpoint, {mine} now")
        self.seed = int(state["seed"])
        self.step = int(state["step"])
