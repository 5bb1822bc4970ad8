"""GroupNorm, GroupNorm-FiLM and the fused GroupNorm-SiLU node on depth shards.

A group's statistics span the whole volume. Forward: each rank computes its slices' per-group mean
and variance, the ranks exchange these (B, G, 2) numbers (one all-gather) and every rank combines
them in rank order (Chan's pairwise formula for equal counts), so all hold bitwise the same mean and
reciprocal std, which the node saves. Inside a memory-efficient segment's forward the statistics are
also kept in the segment's node (:mod:`idm3d.invertible.record`), and the rebuild in backward reuses
them: no second all-gather. Backward needs two more group sums over the volume (the
gradient's mean and its correlation with the normalised input); both go in one all-reduce. The
affine and FiLM gradients are per-channel sums, this rank's part of which is its partial gradient
(replicated values carry partial gradients, see :mod:`idm3d.domain.comm`).

Like :func:`~idm3d.invertible.norm_act.group_norm_silu`, the node saves only its input and the
statistics and rebuilds the normalised map in backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from idm3d.domain.comm import domain_of, gather_list, reduce_
from idm3d.invertible.mode import first_order_only
from idm3d.invertible.norm_act import _channel_dots
from idm3d.invertible.record import keep, replayed

__all__ = ["DomainGroupNorm", "domain_group_norm"]

_CL = torch.channels_last_3d
_SPATIAL = (2, 3, 4)


def _stats(x: Tensor, groups: int, eps: float, key: int) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and reciprocal std over the whole volume, (B, G) each."""
    # per channel first: a strided reduction, no copy of a channels-last x; then channels -> groups and
    # ranks -> volume by the pairwise formula for equal counts (no E[x^2] - E[x]^2 cancellation)
    var_c, mean_c = torch.var_mean(x, dim=_SPATIAL, correction=0)
    var_c, mean_c = var_c.reshape(x.shape[0], groups, -1), mean_c.reshape(x.shape[0], groups, -1)
    mean = mean_c.mean(-1)
    var = var_c.mean(-1) + (mean_c - mean[..., None]).square().mean(-1)
    parts = torch.stack(gather_list(torch.stack((mean, var)), domain_of(key), "stats"))  # (R, 2, B, G)
    means, variances = parts[:, 0], parts[:, 1]
    mean = means.mean(0)
    var = variances.mean(0) + (means - mean).square().mean(0)  # equal counts per rank
    return mean, torch.rsqrt(var + eps)


def _per_channel(t: Tensor, channels: int) -> Tensor:
    """(B, G) -> (B, C, 1, 1, 1), each group's value repeated over its channels."""
    b, g = t.shape
    return t[:, :, None].expand(b, g, channels // g).reshape(b, channels, 1, 1, 1)


def _affine(mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, c: int) -> tuple[Tensor, Tensor]:
    """``a, beta`` with ``norm(x) = a * x + beta`` per (sample, channel)."""
    m, r = _per_channel(mean, c), _per_channel(rstd, c)
    w = weight.reshape(1, c, 1, 1, 1) if weight is not None else 1.0
    a = r * w
    beta = -m * a + (bias.reshape(1, c, 1, 1, 1) if bias is not None else 0.0)
    return a, beta


class _DomainGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        scale: Tensor | None,
        shift: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        key: int,
        groups: int,
        silu: bool,
        channels_last: bool,
    ) -> Tensor:
        c = x.shape[1]
        a, beta = _affine(mean, rstd, weight, bias, c)
        if scale is not None:  # FiLM folded into the affine map: one full-size output, no temporaries
            a, beta = a * scale, torch.addcmul(shift, beta, scale)
        # one full-size map, made in the layout the caller asked for (no reordered copy after)
        out = torch.empty_like(x, memory_format=_CL if channels_last else torch.preserve_format)
        torch.addcmul(beta, x, a, out=out)
        if silu:
            out = torch.nn.functional.silu(out, inplace=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd, scale, shift)
        ctx.key, ctx.groups, ctx.silu = key, groups, silu
        return out

    @staticmethod
    @first_order_only  # the rebuild is not itself differentiable: refuse double backward
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, mean, rstd, scale, shift = ctx.saved_tensors
        need_x, need_w, need_b, need_scale, need_shift = ctx.needs_input_grad[:5]
        b, c = x.shape[:2]
        a0, beta0 = _affine(mean, rstd, weight, bias, c)  # n = a0 x + beta0: the normalised, affine map
        a, beta = (a0 * scale, torch.addcmul(shift, beta0, scale)) if scale is not None else (a0, beta0)
        if ctx.silu:
            dz = torch.addcmul(beta, x, a)  # the SiLU input, rebuilt, then overwritten by dL/dz
            torch.ops.aten.silu_backward.grad_input(grad, dz, grad_input=dz)
        else:
            dz = grad
        # P = sum(dz * x), Q = sum(dz) per (sample, channel): everything below is built from them
        p = _channel_dots(dz, x)  # batched products, no product map
        q = dz.sum(dim=_SPATIAL, keepdim=True)
        g_scale = a0 * p + beta0 * q if scale is not None and need_scale else None  # sum(dz * n)
        g_shift = q if scale is not None and need_shift else None
        s = scale if scale is not None else 1.0
        sp, sq = s * p, s * q  # sum(dn * x), sum(dn), dn = dL/dn
        m, r = _per_channel(mean, c), _per_channel(rstd, c)
        xhat_dot = r * (sp - m * sq)  # sum(dn * xhat) per (sample, channel)
        g_w = xhat_dot.sum(0).flatten() if weight is not None and need_w else None
        g_b = sq.sum(0).flatten() if bias is not None and need_b else None
        gx = None
        if need_x:
            w = weight.reshape(1, c, 1, 1, 1) if weight is not None else torch.ones_like(sq)
            # the two group sums over the whole volume, in one all-reduce
            sums = torch.stack(((w * sq).reshape(b, ctx.groups, -1).sum(-1), (w * xhat_dot).reshape(b, ctx.groups, -1)
                                .sum(-1)))
            reduce_(sums, domain_of(ctx.key))
            count = x[0, 0].numel() * domain_of(ctx.key).size * (c // ctx.groups)
            mean_dxhat, mean_dxhat_xhat = _per_channel(sums[0] / count, c), _per_channel(sums[1] / count, c)
            # dx = r (w s dz - mean(dxhat) - xhat mean(dxhat xhat)), xhat = (x - m) r: k1 dz + k2 x + k3
            k1 = r * w * s
            k2 = -r * r * mean_dxhat_xhat
            k3 = r * (r * m * mean_dxhat_xhat - mean_dxhat)
            # with SiLU, dz is this node's own buffer and the input gradient takes its place
            gx = dz.mul_(k1).addcmul_(x, k2).add_(k3) if ctx.silu else torch.addcmul(k3, x, k2).addcmul_(dz, k1)
        return gx, g_w, g_b, g_scale, g_shift, None, None, None, None, None, None


def domain_group_norm(
    x: Tensor,
    norm: nn.GroupNorm,
    key: int,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = False,
    channels_last: bool = False,
) -> Tensor:
    """``[silu](addcmul(shift, norm(x_full), scale))`` on this rank's depth slices of ``x_full``.

    Args:
        x: this rank's slices (B, C, d, H, W).
        norm: the GroupNorm whose groups, eps and affine parameters apply.
        key: the registered domain.
        scale: FiLM multiplier (B, C, 1, 1, 1) or ``None``; ``shift`` goes with it.
        shift: FiLM offset (B, C, 1, 1, 1) or ``None``.
        silu: apply SiLU (the fused GroupNorm-SiLU node).
        channels_last: return the result channels-last on CPU (as the fused node does).
    """
    device = x.device.type
    channels_last = channels_last and device == "cpu"
    if torch.is_autocast_enabled(device):
        # GroupNorm autocasts to fp32: so does this node
        with torch.autocast(device, enabled=False):
            return domain_group_norm(x.float(), norm, key, scale, shift, silu, channels_last)
    stats = replayed(norm)  # a rebuild in a segment's backward: the forward's statistics, no collective
    if stats is None:
        with torch.no_grad():  # the node's backward differentiates through the statistics itself
            stats = _stats(x, norm.num_groups, norm.eps, key)
        keep(norm, stats)
    w, b = norm.weight, norm.bias
    return _DomainGroupNorm.apply(x, w, b, scale, shift, *stats, key, norm.num_groups, silu, channels_last)


class DomainGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` over a depth-sharded volume (same parameters and state dict).

    :func:`~idm3d.invertible.norm_act.group_norm_silu` hands the fused GroupNorm(-FiLM)-SiLU node to
    :meth:`group_norm_silu` when the norm has one, so couplings, stem and head need no change.
    """

    _domain_key: int

    def forward(self, x: Tensor) -> Tensor:
        return domain_group_norm(x, self, self._domain_key)

    def group_norm_silu(
        self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, channels_last: bool = False
    ) -> Tensor:
        """The fused node, sharded: ``silu(addcmul(shift, self(x), scale))``."""
        return domain_group_norm(x, self, self._domain_key, scale, shift, silu=True, channels_last=channels_last)
