"""The channel variant of :class:`~idm3d.invertible.attention.InvertibleAttention3d`.

``T`` is ``(C/h) x (C/h)`` per head, from a transposed (channel-token) attention pooled over the
voxels of ``x1``, and acts on the channel axis of every voxel; see the attention module's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from idm3d.invertible import linalg
from idm3d.invertible.attention import Gains, InvertibleAttention3d
from idm3d.invertible.attention_masks import VoxelSplit, voxel_parity
from idm3d.invertible.base import BackwardResult, grad_parameters

__all__ = ["ChannelAttention3d"]

# (voxel parity, T_p) for each parity that has transformed entries; T_p is (B, heads, k, k).
Blocks = list[tuple[int, Tensor]]


class ChannelAttention3d(InvertibleAttention3d):
    """Invertible attention over channels (``variant="channel"``): ``O(C^2 N)`` at any resolution.

    Takes the arguments of :class:`~idm3d.invertible.attention.InvertibleAttention3d` (``variant``
    may be omitted; ``key_dim`` must stay ``None``).
    """

    variant = "channel"

    def _key_width(self) -> int:
        return self.channels

    def _matrices(self, x: Tensor, gains: Gains, split: VoxelSplit, passing: Tensor) -> Tensor:
        """``T`` (B, heads, k, k), from ``x * M`` only."""
        return self._from_gram(self._passing_gram(x, passing), gains)

    def _passing_gram(self, x: Tensor, passing: Tensor) -> Tensor:
        """The Gram matrix ``x1 x1^T`` (B, C, C) of the passing half ``x1 = x * M``."""
        x1 = torch.where(passing, x, 0.0).flatten(2)
        return x1 @ x1.mT

    def _from_gram(self, gram: Tensor, gains: Gains) -> Tensor:
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

    def _parity_blocks(self, t: Tensor, split: VoxelSplit) -> Blocks:
        """The matrix acting at parity-``p`` voxels, ``T[S, S]`` embedded in I."""
        mats: Blocks = []
        for p in (0, 1):
            if not self._moves_any[p] or split.counts[p] == 0:
                continue
            if self._moves_all[p]:
                mats.append((p, t))
                continue
            m = self._moving[p].to(t.dtype)[None]  # (1, h, k)
            mats.append((p, m[..., :, None] * t * m[..., None, :] + torch.diag_embed(1.0 - m)))
        return mats

    def _forward_map(self, x: Tensor, mats: Tensor, split: VoxelSplit, passing: Tensor) -> Tensor:
        # y = T x2 on the moving entries, x elsewhere, with x2 = x * (1 - M). At a voxel whose
        # moving channels are S this is T[S, S] x_S: one T serves both mask phases.
        b, h, k = x.shape[0], self.heads, self.head_dim
        x2 = torch.where(passing, 0.0, x).view(b, h, k, -1)
        return torch.where(passing, x, (mats @ x2).view_as(x))

    def _inverse_map(self, y: Tensor, mats: Tensor, split: VoxelSplit, passing: Tensor) -> Tensor:
        b, h, k = y.shape[0], self.heads, self.head_dim
        y2 = torch.where(passing, 0.0, y).view(b, h, k, -1)
        # T_p = T[S_p, S_p] embedded in the identity; linalg.solve(T_p, y2) is right on parity-p voxels.
        solved = {p: linalg.solve(t, y2).reshape(y.shape) for p, t in self._parity_blocks(mats, split)}
        del y2
        if not solved:
            return y.clone()
        if len(solved) == 2:
            moved = torch.where(voxel_parity(y.shape[2:], y.device), solved[1], solved[0])
        else:
            (moved,) = solved.values()
        return torch.where(passing, y, moved)

    def _log_det(self, x: Tensor, mats: Tensor, split: VoxelSplit) -> Tensor:
        out = x.new_zeros(x.shape[0])
        for p, t in self._parity_blocks(mats, split):
            # the same T_p (identity rows for passing channels) acts at every parity-p voxel
            out = out + split.counts[p] * linalg.logabsdet(t).sum(-1)
        return out

    def _backward(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        """Analytic backward: a few (B, C, N) temporaries, no recorded graph.

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
            gram = self._passing_gram(y, passing)
        gram.requires_grad_(True)
        with torch.enable_grad():
            t = self._from_gram(gram, gains)
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
