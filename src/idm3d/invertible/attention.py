"""Exact invertible 3D attention: iTrans of AttnFlow (Sukthanker et al., CVPR 2021) made 3D.

A 3D checkerboard mask ``M`` (see :mod:`idm3d.invertible.attention_masks`) splits the entries of
``x`` into a pass-through half ``x1 = x * M`` and a transformed half ``x2 = x * (1 - M)``. The
attention weights ``A`` are a function of ``x1`` alone, and ``y1 = x1``, so the inverse rebuilds
exactly the same ``A`` from ``y1``. The transformed half becomes

    y2 = T x2,   T = (A + c I) / (1 + c),   c = 1 + softplus(theta) > 1  (one c per head).

``A`` is row-stochastic (a softmax), so its eigenvalues satisfy ``|lambda| <= 1 < c`` and
``A + c I`` is invertible; so is any principal submatrix (a row-substochastic block has spectral
radius <= 1 as well). Dividing by ``1 + c`` (``normalize=True``, the default) keeps ``T``
row-stochastic, so a stack of these layers neither blows up nor shrinks activations; in the
infinity norm ``cond(T) <= (c + 1) / (c - 1)`` (3 at the initial ``c = 2``). With
``normalize=False`` the map is the paper's literal ``A + c I``. The inverse solves ``T x2 = y2``
with :func:`idm3d.invertible.linalg.solve` (a batched solve that is safe on multi-threaded CPUs).

Variants (one class each, :class:`ChannelAttention3d` in :mod:`~idm3d.invertible.attention_channel`
and :class:`SpatialAttention3d` in :mod:`~idm3d.invertible.attention_spatial`, both subclasses of
:class:`InvertibleAttention3d`; the factory ``invertible_attention(channels, variant=...)`` builds the
one named):

* ``"channel"``: ``A`` is ``(C/h) x (C/h)`` per head, from a transposed (channel-token)
  attention: queries/keys are 1x1 projections of ``x1``, L2-normalised over the voxels of ``x1``
  (so their inner product is a cosine similarity pooled over voxels), times a learned temperature.
  ``T`` acts on the channel axis of every voxel. At a voxel where only the channel set ``S``
  is transformed (``channel_alternating=True``) the map is the principal block ``T[S, S]`` on
  those entries and the identity on the others. Cost ``O(C^2 N)`` at any resolution.
* ``"spatial"``: tokens are the voxels of one parity, and ``A`` is ``n x n`` over them (``n`` about
  ``N/2``), per head, acting on the voxel axis of the head's transformed channels. A token's
  query/key is a 1x1 projection of the 3x3x3 average of ``x1`` around the voxel (its neighbours
  belong to ``x1``), so the map restricted to the transformed entries is exactly ``T`` and the
  pass-through entries are untouched. Without channel alternation only parity-1 voxels are tokens;
  with it, both parities are (two matrices: parity ``p`` voxels transform channels with
  ``(c + p)`` odd). ``N = D*H*W`` above ``max_tokens`` raises a ``ValueError``.

Conditioning: ``forward(x, emb)`` with ``emb`` of shape ``(B, cond_dim)`` scales the features fed to
the query and key projections per channel, ``(1 + Linear(emb))``; the Linear starts with tiny
weights and zero bias, so a fresh module is (almost) unconditioned but ``emb`` gets gradients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.invertible.attention_masks import VoxelSplit, pass_table, passing_entries, voxel_split
from idm3d.invertible.base import BackwardResult, InvertibleModule, grad_parameters

__all__ = ["InvertibleAttention3d", "invertible_attention"]

VARIANTS = ("channel", "spatial")
MASKS = ("checkerboard",)
Gains = tuple[Tensor, Tensor] | None


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def invertible_attention(channels: int, variant: str = "channel", *args: Any, **kwargs: Any) -> InvertibleAttention3d:
    """Build the invertible attention ``variant`` names: a :class:`ChannelAttention3d` or a :class:`SpatialAttention3d`.

    Args:
        channels: number of input (= output) channels.
        variant: ``"channel"`` or ``"spatial"``.
        *args: the further positional arguments of :class:`InvertibleAttention3d` (``heads``, ...).
        **kwargs: its keyword arguments.
    """
    # Imported here: both variants subclass InvertibleAttention3d, defined below.
    from idm3d.invertible.attention_channel import ChannelAttention3d
    from idm3d.invertible.attention_spatial import SpatialAttention3d

    classes: dict[object, type[InvertibleAttention3d]] = {"channel": ChannelAttention3d, "spatial": SpatialAttention3d}
    if variant not in classes:
        raise ValueError(f"invertible_attention: variant must be one of {VARIANTS}, got {variant!r}")
    return classes[variant](channels, variant, *args, **kwargs)


class _DeprecatedBaseCall(type(InvertibleModule)):  # type: ignore[misc]
    """Calling the base class itself still builds a variant, with a ``DeprecationWarning``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is InvertibleAttention3d:
            warnings.warn(
                "InvertibleAttention3d(...) is deprecated; call invertible_attention(...) or build "
                "ChannelAttention3d / SpatialAttention3d",
                DeprecationWarning,
                stacklevel=2,
            )
            return invertible_attention(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class InvertibleAttention3d(InvertibleModule, metaclass=_DeprecatedBaseCall):
    """Masked (checkerboard) self-attention with an exact inverse and a tractable log-determinant.

    The common base of :class:`ChannelAttention3d` and :class:`SpatialAttention3d` (build one with
    :func:`invertible_attention` or its class), holding what they share: the validation, the
    query/key/temperature/scale parameters, the FiLM conditioning, the mask and the autocast/dtype
    contract. Calling ``InvertibleAttention3d(channels, variant=...)`` itself is deprecated: it
    warns and returns :func:`invertible_attention`'s result.

    Args:
        channels: number of input (= output) channels.
        variant: ``"channel"`` (C x C attention, any resolution) or ``"spatial"`` (voxel x voxel).
        heads: attention heads; ``channels`` must be divisible by it. Each head has its own ``A`` and
            its own ``c`` and acts on its own ``channels // heads`` channels (the channel variant with
            one channel per head is the identity: a 1x1 row-stochastic matrix is 1).
        cond_dim: size of the conditioning vector ``cond[0]`` of shape ``(B, cond_dim)``, or ``None``
            (then extra conditioning tensors are ignored, so the module fits any segment).
        max_tokens: largest ``D*H*W`` the spatial variant accepts (its ``A`` is quadratic in it).
        mask: the mask pattern; only ``"checkerboard"`` (parity of ``d+h+w``).
        channel_alternating: use the parity of ``c+d+h+w`` instead, so every voxel keeps half of its
            channels (and every channel half of its voxels).
        key_dim: query/key width per head for the spatial variant (default ``channels // heads``);
            the channel variant's tokens are the channels themselves, so it must stay ``None``.
        normalize: divide ``A + c I`` by ``1 + c`` (row-stochastic, scale-preserving).
        init_scale: initial ``c`` (> 1); larger starts closer to the identity.

    Odd sizes: parity-0 voxels number ``ceil(N/2)``, parity-1 ``floor(N/2)``; without channel
    alternation the parity-0 voxels pass, so ``C * floor(N/2)`` entries are transformed.
    """

    variant: str = ""  # set by each subclass

    def __init__(
        self,
        channels: int,
        variant: str | None = None,
        heads: int = 1,
        cond_dim: int | None = None,
        max_tokens: int = 4096,
        mask: str = "checkerboard",
        channel_alternating: bool = False,
        key_dim: int | None = None,
        normalize: bool = True,
        init_scale: float = 2.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if variant is not None and variant != self.variant:
            raise ValueError(f"{name}: variant must be {self.variant!r} (or None), got {variant!r}")
        if mask not in MASKS:
            raise ValueError(f"{name}: mask must be one of {MASKS}, got {mask!r}")
        if channels < 1:
            raise ValueError(f"{name}: channels must be >= 1, got {channels}")
        if heads < 1 or channels % heads:
            raise ValueError(
                f"{name}: channels must be divisible by heads >= 1, got channels={channels}, heads={heads}"
            )
        if self.variant == "channel" and key_dim is not None:
            raise ValueError(
                f"{name}: key_dim applies to variant='spatial' only (channel attention uses the channels "
                f"as tokens), got key_dim={key_dim}"
            )
        key_dim = channels // heads if key_dim is None else key_dim
        if key_dim < 1:
            raise ValueError(f"{name}: key_dim must be >= 1, got {key_dim}")
        if cond_dim is not None and cond_dim < 1:
            raise ValueError(f"{name}: cond_dim must be >= 1 or None, got {cond_dim}")
        if max_tokens < 1:
            raise ValueError(f"{name}: max_tokens must be >= 1, got {max_tokens}")
        if not init_scale > 1.0:
            raise ValueError(f"{name}: init_scale must be > 1 (A + cI is invertible for c > 1), got {init_scale}")
        self.channels, self.heads = channels, heads
        self.head_dim = channels // heads
        self.key_dim = key_dim
        self.cond_dim, self.max_tokens = cond_dim, max_tokens
        self.mask, self.channel_alternating, self.normalize = mask, channel_alternating, normalize

        width = self._key_width()
        self.to_q = nn.Linear(channels, width, bias=False)
        self.to_k = nn.Linear(channels, width, bias=False)
        self.temperature = nn.Parameter(torch.ones(heads))
        self.scale_logit = nn.Parameter(torch.full((heads,), _inverse_softplus(init_scale - 1.0)))
        self.film: nn.Linear | None = None
        if cond_dim is not None:
            self.film = nn.Linear(cond_dim, 2 * channels)
            # Near-neutral (scales ~1e-2 for unit-scale embeddings) yet not zero, so the
            # conditioning vector receives a gradient from the first step.
            nn.init.normal_(self.film.weight, std=0.01 / math.sqrt(cond_dim))
            nn.init.zeros_(self.film.bias)

        table = pass_table(channels, channel_alternating)
        moving = (~table).view(2, heads, self.head_dim)
        # Python-side flags: no device sync to decide which parities need work.
        self._moves_any = tuple(bool(m.any()) for m in moving)
        self._moves_all = tuple(bool(m.all()) for m in moving)
        self.register_buffer("_moving", moving, persistent=False)

    # ------------------------------------------------------------------ what a variant defines

    def _key_width(self) -> int:
        """Output width of the query/key projections."""
        raise NotImplementedError

    def _check_grid(self, spatial: tuple[int, ...]) -> None:
        """Raise a ``ValueError`` for a grid the variant cannot take (default: any grid is fine)."""

    def _matrices(self, x: Tensor, gains: Gains, split: VoxelSplit, passing: Tensor) -> Any:
        """The maps ``T`` built from ``x * M`` only (the same from ``y * M``)."""
        raise NotImplementedError

    def _forward_map(self, x: Tensor, mats: Any, split: VoxelSplit, passing: Tensor) -> Tensor:
        raise NotImplementedError

    def _inverse_map(self, y: Tensor, mats: Any, split: VoxelSplit, passing: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_det(self, x: Tensor, mats: Any, split: VoxelSplit) -> Tensor:
        raise NotImplementedError

    def _backward(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers

    @property
    def scale(self) -> Tensor:
        """The per-head ``c = 1 + softplus(theta) > 1``."""
        return 1.0 + F.softplus(self.scale_logit)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, variant={self.variant!r}, heads={self.heads}, cond_dim={self.cond_dim}, "
            f"channel_alternating={self.channel_alternating}, normalize={self.normalize}"
        )

    def _prepare(self, x: Tensor, cond: Sequence[Tensor]) -> tuple[Gains, VoxelSplit, Tensor]:
        """Validate ``x`` and ``cond``; return the FiLM gains, the voxel split and the pass mask."""
        name = type(self).__name__
        self.check_input(x, self.channels)
        spatial = tuple(int(s) for s in x.shape[2:])
        self._check_grid(spatial)
        gains = None
        if self.film is not None:
            if not cond or cond[0] is None:
                raise ValueError(f"{name}: expected a conditioning vector of shape (B, {self.cond_dim}), got none")
            emb = cond[0].to(self.film.weight.dtype)  # e.g. a bf16 embedding from an autocast MLP
            if emb.dim() != 2 or emb.shape != (x.shape[0], self.cond_dim):
                raise ValueError(
                    f"{name}: expected conditioning of shape ({x.shape[0]}, {self.cond_dim}), got {tuple(emb.shape)}"
                )
            gq, gk = self.film(emb).chunk(2, dim=1)
            gains = (gq, gk)
        passing = passing_entries(self.channels, spatial, self.channel_alternating, x.device)
        return gains, voxel_split(spatial, x.device), passing

    def _weights(self, gains: Gains) -> tuple[Tensor, Tensor]:
        """Query/key projections with the FiLM gains folded in: ``W diag(1 + g)``, (B or 1, out, C)."""
        wq, wk = self.to_q.weight[None], self.to_k.weight[None]
        if gains is None:
            return wq, wk
        return wq * (1.0 + gains[0])[:, None, :], wk * (1.0 + gains[1])[:, None, :]

    def _shifted(self, attn: Tensor) -> Tensor:
        """``(A + c I) / (1 + c)`` (or ``A + c I``) with a single new (.., n, n) tensor."""
        c = self.scale.to(attn.dtype).view(1, self.heads, 1)
        t = attn / (1.0 + c[..., None]) if self.normalize else attn.clone()
        # in place on a fresh tensor: neither the division nor the clone needs it for backward
        t.diagonal(dim1=-2, dim2=-1).add_(c / (1.0 + c) if self.normalize else c)
        return t

    # ------------------------------------------------------------------ contract

    # Autocast is switched off inside and inputs are cast to the parameters' dtype: the inverse
    # must rebuild the matrices the forward used at the very same precision, and linalg.solve /
    # slogdet have no half-precision kernels. Outputs come back in the input's dtype.

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xw = x.to(self.temperature.dtype)
            gains, split, passing = self._prepare(xw, cond)
            return self._forward_map(xw, self._matrices(xw, gains, split, passing), split, passing).to(x.dtype)

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        with torch.autocast(y.device.type, enabled=False):
            yw = y.to(self.temperature.dtype)
            gains, split, passing = self._prepare(yw, cond)
            # y * M == x * M: the very matrices of the forward.
            return self._inverse_map(yw, self._matrices(yw, gains, split, passing), split, passing).to(y.dtype)

    def log_det(self, x: Tensor, *cond: Tensor) -> Tensor:
        """Per-sample ``log|det dy/dx|``: each ``log|det T_p|`` times the entries it moves."""
        with torch.autocast(x.device.type, enabled=False):
            xw = x.to(self.temperature.dtype)
            gains, split, passing = self._prepare(xw, cond)
            return self._log_det(xw, self._matrices(xw, gains, split, passing), split)

    def backward_pass(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        with torch.autocast(y.device.type, enabled=False):
            dtype = self.temperature.dtype
            x, grad_x, grad_cond, grad_params = self._backward(y.detach().to(dtype), grad_y.to(dtype), cond)
        return x.to(y.dtype), grad_x.to(grad_y.dtype), grad_cond, grad_params

    def backward_at(self, x: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        """:meth:`backward_pass` at a known input ``x`` (one kept from forward): no inverse, no solve.

        Returns ``x`` itself as the rebuilt input and the gradients by autograd through the forward.
        """
        with torch.autocast(x.device.type, enabled=False):
            dtype = self.temperature.dtype
            xw = x.detach().to(dtype).requires_grad_(True)
            wanted_cond = [c for c in cond if c.requires_grad]
            with torch.enable_grad():
                gains, split, passing = self._prepare(xw, cond)
                y = self._forward_map(xw, self._matrices(xw, gains, split, passing), split, passing)
            grads = torch.autograd.grad(
                y, [xw, *wanted_cond, *grad_parameters(self)], grad_y.to(dtype), allow_unused=True
            )
        cond_iter = iter(grads[1 : 1 + len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return x, grads[0].to(grad_y.dtype), grad_cond, list(grads[1 + len(wanted_cond) :])
