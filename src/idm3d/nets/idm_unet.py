"""IDMUNet: a 3D diffusion denoiser whose U-Net core is invertible and stores no activations.

Layout (``levels=L``, core width ``C``, ``down_fraction=f``)::

    x ─ Stem ─┬─ level 0: couplings ─ split ─┬─ skip (C - fC channels) ─────────────── merge ─ couplings ─ Head
              │                              └─ down (fC -> 8fC channels, half size)     │
              │                                   level 1 ... (same)                      up
              │                                   level L-1: couplings (+ attention)  ────┘

Every arrow inside the core is invertible (additive couplings, channel split/merge, orthogonal
2x2x2 down/upsampling, invertible attention on the skips), so the core is one
:class:`~idm3d.invertible.InvertibleSequence` whose backward rebuilds activations from the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from idm3d.errors import ArgumentError
from idm3d.invertible import (
    AdditiveCoupling,
    Apply,
    ChannelMerge,
    ChannelSplit,
    InvertibleModule,
    InvertibleSequence,
    OrthogonalDownsample3d,
    OrthogonalUpsample3d,
)
from idm3d.invertible.attention import invertible_attention
from idm3d.invertible.mode import hooked, memory_efficient_mode
from idm3d.nets.bookends import Head, Stem
from idm3d.nets.config import records_config
from idm3d.nets.embedding import TimestepEmbedding
from idm3d.nets.inference import head_no_grad, stem_no_grad

__all__ = ["IDMUNet"]


@records_config  # net.config: the constructor arguments (idm3d.nets.config)
class IDMUNet(nn.Module):
    """Invertible diffusion U-Net, a drop-in for MONAI's ``DiffusionModelUNet`` (3D).

    Args:
        spatial_dims: must be 3.
        in_channels: input channels (noisy target + source modalities for translation).
        out_channels: predicted channels.
        channels: core width at full resolution; level ``l`` has ``channels * (8 f)**l``.
        levels: number of resolution levels (``levels - 1`` downsamplings).
        blocks_per_level: couplings per level on the way down and again on the way up.
        attention_levels: per level, whether invertible attention runs on that level's skip
            channels before they are merged back (on the bottleneck for the last level).
        attention: ``"channel"``, ``"spatial"`` or ``"none"``.
        bookends: nonlinear stem/head (``True``) or single 1x1x1 linear convolutions (ablation).
        memory_efficient: rebuild core activations in backward (in place, in the memory of the
            core's output and of the head's gradient: the head runs inside the core's autograd
            node) and recompute the bookends instead of storing them; each GroupNorm-SiLU is one
            lean node and, on CPU, the sub-networks' convolutions run channels-last. ``False``:
            plain autograd throughout, the reference the memory-efficient gradients equal. One
            switch: the :attr:`memory_efficient` property sets the core's, which its
            sub-networks, the head and the stem follow.
        down_fraction: fraction of a level's channels that goes down (``8 f`` is the channel
            growth per level; ``0.25`` doubles it, as a standard U-Net).
        hidden_multiplier: width of each coupling's sub-network relative to its level's width, one
            number or one per level. ``None``: 0.5 at full resolution, 1 elsewhere - the level-0
            sub-networks' transient graph is what bounds the training peak (``idm3d bench memory``).
        num_heads: attention heads.
        context_dim: size of a per-sample context vector added to the timestep embedding.
        resample: ``"cayley"`` or ``"exp"`` parametrisation of the orthogonal resampling.

    Limits of ``memory_efficient=True`` (each refused with a ``RuntimeError``, none silent):

    * no double backward: the core's rebuild and the fused GroupNorm-SiLU nodes are
      first-order only: a graph-building backward (``create_graph=True``, as a gradient penalty
      needs) raises at once; use ``memory_efficient=False`` for it (plain autograd, where
      large volumes' depth-sliced convolutions are once-differentiable too).
    * one backward per forward: the core's backward rebuilds activations in the memory of its
      output, behind the head, so a second backward through a retained graph
      (``retain_graph=True``) raises torch's in-place modification error.
    * parameters stay as they were between forward and backward (no optimizer step in between).

    Random layers in the core are replayed in backward (the core saves the generators' state, see
    :class:`~idm3d.invertible.InvertibleSequence`). Not tested under ``torch.compile``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 32,
        levels: int = 4,
        blocks_per_level: int = 2,
        attention_levels: Sequence[bool] = (False, False, True, True),
        attention: str = "channel",
        bookends: bool = True,
        memory_efficient: bool = True,
        down_fraction: float = 0.25,
        hidden_multiplier: float | Sequence[float] | None = None,
        num_heads: int = 1,
        context_dim: int | None = None,
        resample: str = "cayley",
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ArgumentError("spatial_dims", f"must be 3, got {spatial_dims}")
        if levels < 1 or blocks_per_level < 1:
            bad = "levels" if levels < 1 else "blocks_per_level"
            raise ArgumentError(bad, f"must be >= 1, got {min(levels, blocks_per_level)}")
        if len(attention_levels) != levels:
            raise ArgumentError("attention_levels", f"needs {levels} entries, got {len(attention_levels)}")
        if attention not in ("channel", "spatial", "none"):
            raise ArgumentError("attention", f"must be 'channel', 'spatial' or 'none', got {attention!r}")
        widths = [channels]
        for level in range(1, levels):
            down = widths[-1] * down_fraction
            if down != int(down) or int(down) < 1 or int(down) >= widths[-1]:
                raise ArgumentError(
                    "down_fraction", f"level {level - 1} has {widths[-1]} channels; down_fraction={down_fraction} "
                    "must send a whole number of them (at least one, not all) down"
                )
            widths.append(8 * int(down))
        if channels < 2:
            raise ArgumentError("channels", f"must be >= 2, got {channels}")
        if hidden_multiplier is None:
            hidden_multiplier = (0.5,) + (1.0,) * (levels - 1)
        elif isinstance(hidden_multiplier, (int, float)):
            hidden_multiplier = (float(hidden_multiplier),) * levels
        if len(hidden_multiplier) != levels or min(hidden_multiplier) <= 0:
            raise ArgumentError(
                "hidden_multiplier", f"needs one positive number or {levels}, got {hidden_multiplier}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.levels, self.widths = levels, widths
        self.embed_dim = 4 * channels
        self.time_embed = TimestepEmbedding(channels, self.embed_dim, context_dim)
        self.stem = Stem(in_channels, channels, nonlinear=bookends)
        self.head = Head(channels, out_channels, nonlinear=bookends)
        ops, self.op_names = self._core_ops(
            widths, blocks_per_level, attention_levels, attention, hidden_multiplier, num_heads, resample
        )
        self.core = InvertibleSequence(ops, memory_efficient=memory_efficient)

    def _core_ops(
        self,
        widths: list[int],
        blocks: int,
        attention_levels: Sequence[bool],
        attention: str,
        hidden_multiplier: Sequence[float],
        num_heads: int,
        resample: str,
    ) -> tuple[list[nn.Module], list[str]]:
        ops: list[nn.Module] = []
        names: list[str] = []

        def add(name: str, op: nn.Module) -> None:
            ops.append(op)
            names.append(name)

        def couplings(prefix: str, level: int) -> None:
            width = widths[level]
            hidden = max(int(width * hidden_multiplier[level]), 2)
            for b in range(blocks):
                add(f"{prefix}.coupling{b}", AdditiveCoupling(width, hidden, cond_dim=self.embed_dim, flip=b % 2 == 1))

        bottom = len(widths) - 1
        for level, width in enumerate(widths[:-1]):
            couplings(f"down{level}", level)
            down = widths[level + 1] // 8
            add(f"down{level}.split", ChannelSplit((width - down, down)))
            add(f"down{level}.downsample", Apply(OrthogonalDownsample3d(down, resample)))
        couplings(f"bottom{bottom}", bottom)
        if attention != "none" and attention_levels[bottom]:
            add(f"bottom{bottom}.attention", Apply(self._attention(widths[-1], attention, num_heads)))
        for level in reversed(range(bottom)):
            width, down = widths[level], widths[level + 1] // 8
            add(f"up{level}.upsample", Apply(OrthogonalUpsample3d(down, resample)))
            if attention != "none" and attention_levels[level]:
                add(f"up{level}.skip_attention", Apply(self._attention(width - down, attention, num_heads), index=-2))
            add(f"up{level}.merge", ChannelMerge((width - down, down)))
            couplings(f"up{level}", level)
        return ops, names

    def _attention(self, channels: int, variant: str, heads: int) -> InvertibleModule:
        return invertible_attention(channels, variant=variant, heads=heads, cond_dim=self.embed_dim)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (self.levels - 1)

    @property
    def memory_efficient(self) -> bool:
        """The one switch: the core's; its sub-networks, the head and the stem follow it at call time."""
        return self.core.memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        self.core.memory_efficient = bool(value)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"IDMUNet: expected input of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if s % self.size_multiple]
        if bad:
            raise ValueError(
                f"IDMUNet: spatial sizes must be multiples of {self.size_multiple} (levels={self.levels}), "
                f"got {tuple(x.shape[2:])}; pad or crop the volume"
            )

    def embed(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> Tensor:
        """The conditioning vector every coupling receives."""
        return self.time_embed(timesteps.to(x.device), x.shape[0], context)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> Tensor:
        """Predict noise (or x0/v, by how it was trained) for ``x`` at ``timesteps``.

        Args:
            x: ``(B, in_channels, D, H, W)``; D, H, W multiples of :attr:`size_multiple`.
            timesteps: ``(B,)`` integer (or float) diffusion steps.
            context: optional ``(B, context_dim)`` or ``(B, 1, context_dim)`` vector.
        """
        self._check(x)
        emb = self.embed(x, timesteps, context)
        if not torch.is_grad_enabled() and not hooked(self):
            # Sampling: no graph, so the stem's output is the one full-resolution buffer the core
            # updates in place; stem and head run in depth slabs at large sizes (nets/inference.py).
            # Module hooks (a user's feature taps, the non-finite diagnosis) see only the ordinary path.
            return head_no_grad(self.head, *self.core.forward_(stem_no_grad(self.stem, x), emb))
        if self.memory_efficient and torch.is_grad_enabled():
            # Recomputing the bookends in backward keeps only their inputs: their full-resolution
            # activations then never coexist with the core's, which is what bounds the peak. The
            # head runs inside the core's node, so the core's backward can work in the memory of
            # its output and of the head's gradient (see InvertibleSequence).
            return self.core(checkpoint(self._stem, x, True, use_reentrant=False), emb, head=self.head)
        return self.head(self.core(self._stem(x), emb))

    def _stem(self, x: Tensor, lean: bool = False) -> Tensor:
        # The mode is an argument, not inherited: the checkpoint's recomputation in backward runs
        # outside any caller's context and must build the very graph the forward built.
        with memory_efficient_mode(lean):
            # Under autocast the stem returns bf16/fp16; the core's state (the coupling additions and
            # the orthogonal resampling) stays in the input's precision so inverses stay exact.
            return self.stem(x).to(x.dtype)

    @torch.no_grad()
    def reconstruction_error(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> dict[str, float]:
        """Max abs error of every core op's input as the memory-efficient backward rebuilds it."""
        self._check(x)
        emb = self.embed(x, timesteps, context)
        errors = self.core.reconstruction_error(self._stem(x), emb)
        return dict(zip(self.op_names, errors))

