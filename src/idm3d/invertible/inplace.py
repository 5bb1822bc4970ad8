"""No-grad forward primitives that work in the state's own memory, for sampling.

Without a graph nothing has to be kept for backward, so an invertible network can run like the
memory-efficient backward rebuilds: a coupling adds ``F(x1)`` into ``x2``'s channels, an orthogonal
down/upsampling writes its result over its input one channel at a time (output channels ``8c..8c+7``
of a downsampling occupy exactly input channel ``c``'s memory), a skip join is a wider view of the
buffer the skip was split from. What remains are the working maps of ``F``; a large ``F`` runs in
depth slabs: GroupNorm statistics over the whole volume first (``group_moments``), then each slab
normalised, activated in place and convolved with a halo, as :mod:`~idm3d.invertible.slab_conv`
does. The hidden map's statistics need the whole hidden map, so it is computed twice (once for the
statistics, once for the second convolution) except for the slabs that fit ``work_bytes``.

The sizes come from :func:`inference_budget` (a context variable, like the memory-efficient mode):
a sub-network whose full-size temporaries fit ``work_bytes`` runs unsplit, through the very modules of
the graph path, so its result equals theirs bitwise; only larger ones take the slab path, whose
statistics are summed in another order (equal to ~1e-7 relative, see ``tests/test_inference.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.invertible.slab_conv import _slab_input, slab_ranges

__all__ = [
    "Budget",
    "GroupMoments",
    "adjacent_join",
    "budget",
    "conv_planes",
    "group_moments",
    "inference_budget",
    "norm_act_planes",
    "planes_for",
    "regroup_view",
]

MIB = 2**20


class Budget(NamedTuple):
    """Sizes of the no-grad path: ``slab_bytes`` per slab temporary, ``work_bytes`` of full-size working maps."""

    slab_bytes: int = 32 * MIB
    work_bytes: int = 256 * MIB


_DEFAULT = Budget()
_BUDGET: ContextVar[Budget | None] = ContextVar("idm3d_inference_budget", default=None)


@contextmanager
def inference_budget(slab_bytes: int | None = None, work_bytes: int | None = None) -> Iterator[None]:
    """Within the block, no-grad forwards use these sizes (``None`` keeps the current one).

    Args:
        slab_bytes: bytes one depth-slab temporary may take (its planes follow from it).
        work_bytes: bytes of full-size working maps a sub-network may hold; larger ones run in slabs,
            keeping this many bytes of their hidden map and recomputing the rest.
    """
    old = budget()
    new = Budget(old.slab_bytes if slab_bytes is None else int(slab_bytes),
                 old.work_bytes if work_bytes is None else int(work_bytes))
    if new.slab_bytes < 1 or new.work_bytes < 0:
        raise ValueError(f"inference_budget: slab_bytes must be >= 1 and work_bytes >= 0, got {new}")
    token = _BUDGET.set(new)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def budget() -> Budget:
    """The sizes in force."""
    return _BUDGET.get() or _DEFAULT


def planes_for(x: Tensor, channels: int, slab_bytes: int | None = None) -> int:
    """Depth planes of a ``channels``-wide slab of ``x``'s grid and batch that fit ``slab_bytes``."""
    limit = budget().slab_bytes if slab_bytes is None else slab_bytes
    plane = x.shape[0] * channels * x.shape[3] * x.shape[4] * max(x.element_size(), 4)
    return max(1, limit // max(plane, 1))


class GroupMoments:
    """Per-(sample, group) mean and variance, accumulated slab by slab (Chan et al.'s pairwise update, float64)."""

    def __init__(self, batch: int, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean = torch.zeros(batch, groups, dtype=torch.float64)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        """Add a slab ``(B, C, d, H, W)``; channels are grouped as ``nn.GroupNorm`` groups them."""
        b, _c = x.shape[:2]
        part = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(b, self.groups, -1)
        # two-pass moments with ATen's cascade sums: ~1e-7 relative, 8x faster than var_mean's Welford
        mean = part.mean(-1, keepdim=True)
        centred = part - mean
        var = centred.square_().mean(-1)
        mean = mean[..., 0]
        del centred
        n = part.shape[-1]
        mean, var = mean.double().cpu(), var.double().cpu()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += var * n + delta.square() * (self.count * n / total)
        self.count = total

    def stats(self, eps: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(mean, rstd)``, ``(B, G)`` float32, as ``torch.native_group_norm`` returns them."""
        var = (self.m2 / self.count).clamp_min(0)
        return self.mean.float().to(device), (var + eps).rsqrt().float().to(device)


def group_moments(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """GroupNorm's ``(mean, rstd)`` of ``x`` over the whole volume, read slab by slab (no full-size copy)."""
    acc = GroupMoments(x.shape[0], groups)
    for d0, d1 in slab_ranges(x.shape[2], planes_for(x, x.shape[1])):
        acc.add(x[:, :, d0:d1])
    return acc.stats(eps, x.device)


def norm_act_planes(
    x: Tensor,
    lo: int,
    hi: int,
    norm: nn.GroupNorm,
    stats: tuple[Tensor, Tensor],
    halo: int,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor:
    """``silu(addcmul(shift, norm(x), scale))`` on planes ``[lo - halo, hi + halo)``, zeros outside the volume.

    The zeros are the padding of the convolution that reads the result: "same" padding pads the
    activation, not ``x``. ``stats`` are the whole volume's (:func:`group_moments`), so every slab is
    normalised as the whole-volume GroupNorm normalises it. One new slab-sized tensor.
    """
    mean, rstd = stats
    b, c = x.shape[:2]
    g = norm.num_groups
    depth = x.shape[2]
    part = x[:, :, max(lo - halo, 0) : min(hi + halo, depth)]
    # GroupNorm's own affine form: y = x * (rstd * w) + (b - mean * rstd * w)
    r = rstd.reshape(b, g, 1).expand(b, g, c // g).reshape(b, c)
    m = mean.reshape(b, g, 1).expand(b, g, c // g).reshape(b, c)
    w = norm.weight if norm.affine else torch.ones(c, device=x.device)
    bias = norm.bias if norm.affine else torch.zeros(c, device=x.device)
    # GroupNorm computes in at least float32 (autocast runs it in float32 too)
    dt = torch.promote_types(x.dtype, torch.float32)
    a = (r.to(dt) * w.to(dt))[:, :, None, None, None]
    a0 = (bias.to(dt) - m.to(dt) * a[:, :, 0, 0, 0])[:, :, None, None, None]
    # the zero planes of the halo are part of the one new tensor (no padded copy)
    front, back = max(0, halo - lo), max(0, hi + halo - depth)
    out = part.new_empty((b, c, front + part.shape[2] + back, *part.shape[3:]), dtype=dt)
    if front:
        out[:, :, :front].zero_()
    if back:
        out[:, :, out.shape[2] - back :].zero_()
    body = out[:, :, front : front + part.shape[2]]
    torch.addcmul(a0, part.to(dt), a, out=body)
    if scale is not None and shift is not None:
        torch.addcmul(shift.to(dt), body, scale.to(dt), out=body)  # the FiLM the graph path runs
    F.silu(body, inplace=True)
    return out


def conv_planes(a: Tensor, conv: nn.Conv3d) -> Tensor:
    """A "same" stride-1 convolution of planes that already carry their depth halo: ``halo`` planes fewer out.

    On CPU the call goes to oneDNN directly: ATen's heuristic picks its native loop (several times
    slower) for a 5D input whose ``N*C*D*H`` is under 20,480, which a slab of a few planes often is.
    """
    k = conv.weight.shape[2:]
    padding = (0, k[1] // 2, k[2] // 2)
    weight, bias = conv.weight, conv.bias
    device = a.device.type
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return F.conv3d(a, weight, bias, padding=padding, groups=conv.groups)
    if torch.is_autocast_enabled(device):
        # cast as autocast would; the direct call has no autocast rule of its own
        dtype = torch.get_autocast_dtype(device)
        a, weight = a.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if a.dtype not in (torch.float32, torch.bfloat16) or a.dtype != weight.dtype:
        return F.conv3d(a, weight, bias, padding=padding, groups=conv.groups)
    return torch.ops.aten.mkldnn_convolution(a.contiguous(), weight, bias, padding, (1, 1, 1), (1, 1, 1), conv.groups)


def conv_slab(x: Tensor, conv: nn.Conv3d, lo: int, hi: int) -> Tensor:
    """Output planes ``[lo, hi)`` of ``conv(x)`` ("same" padding, stride 1), reading only the planes they need."""
    part, _, _ = _slab_input(x, lo, hi, conv.weight.shape[2] // 2)
    return conv_planes(part, conv)


def regroup_view(x: Tensor, shape: Sequence[int]) -> Tensor | None:
    """A view of ``x``'s memory with ``shape`` (same batch), or ``None`` where a sample's elements are not dense.

    An orthogonal resampling maps a sample's ``C*D*H*W`` elements to as many; where ``x`` holds them
    in one dense run per sample (a channel block of a contiguous state), the result can live there.
    """
    dense = torch.empty(0).new_empty(tuple(x.shape[1:])).stride() if x.dim() == 5 else None
    if dense is None or tuple(x.stride()[1:]) != tuple(dense) or x.shape[0] != shape[0]:
        return None
    sample = torch.empty(0).new_empty(tuple(shape[1:])).stride()
    return x.as_strided(tuple(shape), (x.stride(0), *sample), x.storage_offset())


def adjacent_join(a: Tensor, b: Tensor) -> Tensor | None:
    """``cat((a, b), dim=1)`` as a view, where ``b``'s channels follow ``a``'s in one buffer; else ``None``."""
    if (
        a.dim() != b.dim()
        or a.dtype != b.dtype
        or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        or a.stride() != b.stride()
        or a.shape[:1] + a.shape[2:] != b.shape[:1] + b.shape[2:]
        or b.storage_offset() != a.storage_offset() + a.shape[1] * a.stride(1)
    ):
        return None
    return a.as_strided((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), a.stride(), a.storage_offset())
