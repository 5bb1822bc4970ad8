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
with ``torch.linalg.solve``.

Variants:

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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.invertible.attention_masks import VoxelSplit, pass_table, passing_entries, voxel_parity, voxel_split
from idm3d.invertible.base import BackwardResult, InvertibleModule, grad_parameters

__all__ = ["InvertibleAttention3d"]

VARIANTS = ("channel", "spatial")
MASKS = ("checkerboard",)
# (voxel parity, T) for each parity that has transformed entries; T is (B, heads, k, k) for the
# channel variant (k = C / heads) and (B, heads, n_p, n_p) for the spatial one.
Matrices = list[tuple[int, Tensor]]


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class InvertibleAttention3d(InvertibleModule):
    """Masked (checkerboard) self-attention with an exact inverse and a tractable log-determinant.

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

    def __init__(
        self,
        channels: int,
        variant: str = "channel",
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
        if variant not in VARIANTS:
            raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}")
        if mask not in MASKS:
            raise ValueError(f"{name}: mask must be one of {MASKS}, got {mask!r}")
        if channels < 1:
            raise ValueError(f"{name}: channels must be >= 1, got {channels}")
        if heads < 1 or channels % heads:
            raise ValueError(
                f"{name}: channels must be divisible by heads >= 1, got channels={channels}, heads={heads}"
            )
        if variant == "channel" and key_dim is not None:
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
        self.channels, self.variant, self.heads = channels, variant, heads
        self.head_dim = channels // heads
        self.key_dim = key_dim
        self.cond_dim, self.max_tokens = cond_dim, max_tokens
        self.mask, self.channel_alternating, self.normalize = mask, channel_alternating, normalize

        width = channels if variant == "channel" else heads * key_dim
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

    # ------------------------------------------------------------------ helpers

    @property
    def scale(self) -> Tensor:
        """The per-head ``c = 1 + softplus(theta) > 1``."""
        return 1.0 + F.softplus(self.scale_logit)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, variant={self.variant!r}, heads={self.heads}, cond_dim={self.cond_dim}, "
            f"channel_alternating={self.channel_alternating}, normalize={self.normalize}"
        )

    def _prepare(self, x: Tensor, cond: Sequence[Tensor]) -> tuple[tuple[Tensor, Tensor] | None, VoxelSplit, Tensor]:
        """Validate ``x`` and ``cond``; return the FiLM gains, the voxel split and the pass mask."""
        name = type(self).__name__
        self.check_input(x, self.channels)
        spatial = tuple(int(s) for s in x.shape[2:])
        n = math.prod(spatial)
        if self.variant == "spatial" and n > self.max_tokens:
            raise ValueError(
                f"{name}(variant='spatial'): {spatial[0]}x{spatial[1]}x{spatial[2]} = {n} voxels exceeds "
                f"max_tokens={self.max_tokens}; use variant='channel' here or raise max_tokens"
            )
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

    def _weights(self, gains: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
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

    def _channel_matrix(self, x: Tensor, gains: tuple[Tensor, Tensor] | None, passing: Tensor) -> Tensor:
        """``T`` (B, heads, k, k) of the channel variant, from ``x * M`` only."""
        x1 = torch.where(passing, x, 0.0).flatten(2)
        return self._channel_from_gram(x1 @ x1.mT, gains)

    def _channel_from_gram(self, gram: Tensor, gains: tuple[Tensor, Tensor] | None) -> Tensor:
        """``T`` from the Gram matrix ``G = x1 x1^T`` (B, C, C) of the passing half.

        Queries/keys ``Q = Wq x1``, ``K = Wk x1`` over voxels enter only through inner products, so
        ``G`` is all the voxel pooling there is: ``Q K^T = Wq G Wk^T`` and ``|Q_i|^2 = (Wq G Wq^T)_ii``;
        no (C, N) query or key tensor is ever built. The attention is the cosine similarity of
        queries and keys (over voxels) times a learned temperature, softmaxed over keys.
        """
        b, h, k = gram.shape[0], self.heads, self.head_dim
        wq, wk = self._weights(gains)
        wq_g = wq @ gram
        qk = (wq_g @ wk.mT).view(b, h, k, h, k).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        eps = torch.finfo(gram.dtype).tiny
        q_norm = (wq_g * wq).sum(-1).clamp_min(eps).sqrt().view(b, h, k, 1)
        k_norm = ((wk @ gram) * wk).sum(-1).clamp_min(eps).sqrt().view(b, h, 1, k)
        tau = self.temperature.to(gram.dtype).view(1, h, 1, 1)
        return self._shifted(torch.softmax(tau * qk / (q_norm * k_norm), dim=-1))

    def _parity_blocks(self, t: Tensor, split: VoxelSplit) -> Matrices:
        """Channel variant: the matrix acting at parity-``p`` voxels, ``T[S, S]`` embedded in I."""
        mats: Matrices = []
        for p in (0, 1):
            if not self._moves_any[p] or split.counts[p] == 0:
                continue
            if self._moves_all[p]:
                mats.append((p, t))
                continue
            m = self._moving[p].to(t.dtype)[None]  # (1, h, k)
            mats.append((p, m[..., :, None] * t * m[..., None, :] + torch.diag_embed(1.0 - m)))
        return mats

    def _spatial_matrices(
        self, x: Tensor, gains: tuple[Tensor, Tensor] | None, split: VoxelSplit, passing: Tensor
    ) -> Matrices:
        """``T_p`` (B, heads, n_p, n_p) over the parity-``p`` voxels, from ``x * M`` only."""
        b, h = x.shape[0], self.heads
        x1 = torch.where(passing, x, 0.0)
        # Explicit zero padding: avg_pool3d's own padding refuses grids smaller than the kernel.
        feats_all = F.avg_pool3d(F.pad(x1, (1, 1, 1, 1, 1, 1)), kernel_size=3, stride=1).flatten(2)
        wq, wk = self._weights(gains)
        tau = self.temperature.to(x.dtype).view(1, h, 1, 1) / math.sqrt(self.key_dim)
        mats: Matrices = []
        for p in (0, 1):
            n = split.counts[p]
            if not self._moves_any[p] or n == 0:
                continue
            feats = feats_all[..., split.index[p]]
            q = (wq @ feats).view(b, h, self.key_dim, n) * tau  # scale the small factor, not the n x n product
            k = (wk @ feats).view(b, h, self.key_dim, n)
            mats.append((p, self._shifted(torch.softmax(q.mT @ k, dim=-1))))
        return mats

    def _spatial_map(self, x: Tensor, mats: Matrices, split: VoxelSplit, solve: bool) -> Tensor:
        """Apply every ``T_p`` on the voxel axis (or ``T_p^-1`` via ``linalg.solve``)."""
        b, c = x.shape[:2]
        flat = x.flatten(2)
        parts = [flat[..., split.index[0]], flat[..., split.index[1]]]
        for p, t in mats:
            xs = parts[p].view(b, self.heads, self.head_dim, -1)
            ys = torch.linalg.solve(t, xs.mT).mT if solve else xs @ t.mT
            if not self._moves_all[p]:
                ys = torch.where(self._moving[p][None, :, :, None], ys, xs)
            parts[p] = ys.reshape(b, c, -1)
        return torch.cat(parts, dim=2)[..., split.restore].view_as(x)

    def _matrices(self, x: Tensor, gains, split: VoxelSplit, passing: Tensor) -> Tensor | Matrices:
        if self.variant == "channel":
            return self._channel_matrix(x, gains, passing)
        return self._spatial_matrices(x, gains, split, passing)

    def _forward_map(self, x: Tensor, mats: Tensor | Matrices, split: VoxelSplit, passing: Tensor) -> Tensor:
        if isinstance(mats, list):
            return self._spatial_map(x, mats, split, solve=False)
        # Channel variant: y = T x2 on the moving entries, x elsewhere, with x2 = x * (1 - M). At a
        # voxel whose moving channels are S this is T[S, S] x_S: one T serves both mask phases.
        b, h, k = x.shape[0], self.heads, self.head_dim
        x2 = torch.where(passing, 0.0, x).view(b, h, k, -1)
        return torch.where(passing, x, (mats @ x2).view_as(x))

    def _inverse_map(self, y: Tensor, mats: Tensor | Matrices, split: VoxelSplit, passing: Tensor) -> Tensor:
        if isinstance(mats, list):
            return self._spatial_map(y, mats, split, solve=True)
        b, h, k = y.shape[0], self.heads, self.head_dim
        y2 = torch.where(passing, 0.0, y).view(b, h, k, -1)
        # T_p = T[S_p, S_p] embedded in the identity; solve(T_p, y2) is right on parity-p voxels.
        solved = {p: torch.linalg.solve(t, y2).reshape(y.shape) for p, t in self._parity_blocks(mats, split)}
        del y2
        if not solved:
            return y.clone()
        if len(solved) == 2:
            moved = torch.where(voxel_parity(y.shape[2:], y.device), solved[1], solved[0])
        else:
            (moved,) = solved.values()
        return torch.where(passing, y, moved)

    def _channel_backward(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        """Analytic backward of the channel variant: a few (B, C, N) temporaries, no recorded graph.

        With ``y = T x2`` on moving entries: ``dL/dT = g2 x2^T`` (g2: dL/dy on moving entries),
        ``dL/dx = T^T g2`` on moving entries and ``g`` elsewhere, plus the path through ``A``:
        autograd runs only on the small graph ``G -> T``, and ``dL/dx1 = (dG + dG^T) x1``.
        """
        b, h, k = y.shape[0], self.heads, self.head_dim
        params = grad_parameters(self)
        wanted_cond = [c for c in cond if c.requires_grad]
        with torch.enable_grad():
            gains, split, passing = self._prepare(y, cond)
        with torch.no_grad():
            x1 = torch.where(passing, y, 0.0).flatten(2)
            gram = x1 @ x1.mT
            del x1
        gram.requires_grad_(True)
        with torch.enable_grad():
            t = self._channel_from_gram(gram, gains)
        with torch.no_grad():
            td = t.detach()
            x = self._inverse_map(y, td, split, passing)
            g2 = torch.where(passing, 0.0, grad_y).view(b, h, k, -1)
            x2 = torch.where(passing, 0.0, x).view(b, h, k, -1)
            grad_t = g2 @ x2.mT
            del x2
            grad_x = torch.where(passing, grad_y, (td.mT @ g2).view_as(y))
            del g2
        grads = torch.autograd.grad(t, [gram, *wanted_cond, *params], grad_t, allow_unused=True)
        with torch.no_grad():
            if grads[0] is not None:
                x1 = torch.where(passing, x, 0.0).flatten(2)
                through_a = ((grads[0] + grads[0].mT) @ x1).view_as(y)
                del x1
                if self.channel_alternating:  # x1 = x * M: only passing entries feed G
                    through_a.masked_fill_(~passing, 0.0)
                grad_x.add_(through_a)
        cond_iter = iter(grads[1 : 1 + len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return x, grad_x, grad_cond, list(grads[1 + len(wanted_cond) :])

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
            mats = self._matrices(xw, gains, split, passing)
            out = xw.new_zeros(x.shape[0])
            if isinstance(mats, list):
                for p, t in mats:
                    # one T_p per head, acting on each of the head's moving channels
                    moving = self._moving[p].sum(-1).to(xw.dtype)
                    out = out + (torch.linalg.slogdet(t).logabsdet * moving).sum(-1)
                return out
            for p, t in self._parity_blocks(mats, split):
                # the same T_p (identity rows for passing channels) acts at every parity-p voxel
                out = out + split.counts[p] * torch.linalg.slogdet(t).logabsdet.sum(-1)
            return out

    def backward_pass(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        with torch.autocast(y.device.type, enabled=False):
            dtype = self.temperature.dtype
            backward = self._channel_backward if self.variant == "channel" else self._spatial_backward
            x, grad_x, grad_cond, grad_params = backward(y.detach().to(dtype), grad_y.to(dtype), cond)
        return x.to(y.dtype), grad_x.to(grad_y.dtype), grad_cond, grad_params

    def _spatial_backward(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        # x1 == y1, so the matrices built from y with a graph are those of the forward: build them
        # once, invert with their values, then replay only the product T x2 with a graph.
        src = y.requires_grad_(True)
        params = grad_parameters(self)
        wanted_cond = [c for c in cond if c.requires_grad]
        with torch.enable_grad():
            gains, split, passing = self._prepare(src, cond)
            mats = self._matrices(src, gains, split, passing)
        with torch.no_grad():
            x = self._inverse_map(y, [(p, t.detach()) for p, t in mats], split, passing)
        x.requires_grad_(True)
        with torch.enable_grad():
            y_graph = self._forward_map(x, mats, split, passing)
        grads = torch.autograd.grad(y_graph, [x, src, *wanted_cond, *params], grad_y, allow_unused=True)
        # src only feeds the matrices through x * M: its gradient is the x1 part of dL/dx via A.
        grad_x = grads[0] if grads[1] is None else grads[0] + grads[1]
        cond_iter = iter(grads[2 : 2 + len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return x.detach(), grad_x, grad_cond, list(grads[2 + len(wanted_cond) :])
