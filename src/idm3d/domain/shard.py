"""Turn a network into its depth-sharded self, and sum its parameter gradients over the domain.

:func:`shard` switches the class of every layer that looks across depth (3D convolutions with a
depth extent, GroupNorms, the invertible attentions) to its domain-parallel subclass in place: the
parameters, their names, the state dict and the optimizer's references all stay as they were.
Everything else (orthogonal 2x2x2 resampling, channel splits, 1x1x1 convolutions, the timestep
embedding) acts slice by slice or on replicated values and runs unchanged on the shard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from idm3d.domain.attention import DomainChannelAttention3d, DomainSpatialAttention3d
from idm3d.domain.comm import COUNTER, Domain, reduce_, register
from idm3d.domain.conv import DomainConv3d
from idm3d.domain.norm import DomainGroupNorm
from idm3d.invertible.attention import InvertibleAttention3d
from idm3d.invertible.attention_channel import ChannelAttention3d
from idm3d.invertible.attention_spatial import SpatialAttention3d

__all__ = ["check_shard_depth", "halo_bytes", "shard", "sync_gradients", "unshard"]

_ORIGINAL = "_domain_original_class"
_BUCKET_BYTES = 4 * 2**20


def _domain_class(module: nn.Module) -> type | None:
    """The domain-parallel class ``module`` becomes, ``None`` if it needs none; raises for layers it cannot shard."""
    name = type(module).__name__
    if isinstance(module, nn.Conv3d) and not isinstance(module, nn.ConvTranspose3d):
        k = module.kernel_size
        if k[0] == 1 and module.padding[0] == 0:
            return None  # no depth extent: slice by slice
        same = all(p == kk // 2 for p, kk in zip(module.padding, k)) and all(kk % 2 for kk in k)
        if not same or module.stride != (1, 1, 1) or module.dilation != (1, 1, 1) or module.padding_mode != "zeros":
            raise ValueError(f"depth sharding: {name} {k} must be a stride-1 'same' zero-padded convolution")
        return DomainConv3d
    if isinstance(module, nn.GroupNorm):
        return DomainGroupNorm
    if isinstance(module, InvertibleAttention3d):
        if module.channel_alternating:
            raise ValueError("depth sharding: invertible attention with channel_alternating=True is not supported")
        if isinstance(module, ChannelAttention3d):
            return DomainChannelAttention3d
        if isinstance(module, SpatialAttention3d):
            return DomainSpatialAttention3d
    depth_mixing = (nn.modules.batchnorm._BatchNorm, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
    if isinstance(module, depth_mixing):
        raise ValueError(f"depth sharding: {name} is not supported")
    return None


def shard(model: nn.Module, group: Any = None) -> nn.Module:
    """Make ``model`` run on depth shards of its inputs over ``group`` (in place; returns ``model``).

    After this, ``model(x_shard, ...)`` on every rank of ``group`` (``x_shard`` from
    :func:`~idm3d.domain.comm.scatter_depth`) returns that rank's slices of ``model(x)``, and a
    backward gives each rank the total input gradient of its slices and *partial* parameter
    gradients; :func:`sync_gradients` sums those. The shard depth must be a multiple of the
    network's ``size_multiple`` (an IDMUNet checks it on every call, with one line).

    Args:
        model: any network built from the layers above (an IDMUNet, a segment, a stem...).
        group: the domain's process group (``None``: the world group).
    """
    key = register(Domain.of(group))
    swaps = [(m, cls) for m in model.modules() if (cls := _domain_class(m)) is not None]  # check all first
    for module, cls in swaps:
        if not hasattr(module, _ORIGINAL):
            setattr(module, _ORIGINAL, type(module))
        module.__class__ = cls
        module._domain_key = key
    multiple = getattr(model, "size_multiple", None)
    if multiple is not None:
        model._domain_key = key
        model._domain_hook = model.register_forward_pre_hook(_check_hook)
    return model


def unshard(model: nn.Module) -> nn.Module:
    """Undo :func:`shard` (in place; returns ``model``): the layers get their own classes back."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            module.__class__ = original
            del module._domain_key
    hook = model.__dict__.pop("_domain_hook", None)
    if hook is not None:
        hook.remove()
        del model._domain_key
    return model


def check_shard_depth(depth: int, size: int, multiple: int) -> None:
    """Raise the one-line error for a shard depth that the resampling levels cannot split."""
    if depth % multiple:
        raise ValueError(
            f"depth sharding: shard depth {depth} (the volume's depth / {size} ranks) must be a multiple of "
            f"{multiple} = 2 ** (levels - 1)"
        )


def _check_hook(model: nn.Module, args: tuple[Any, ...]) -> None:
    from idm3d.domain.comm import domain_of

    if args and isinstance(args[0], Tensor) and args[0].dim() == 5:
        check_shard_depth(args[0].shape[2], domain_of(model._domain_key).size, model.size_multiple)


@torch.no_grad()
def sync_gradients(model: nn.Module, group: Any = None, average: bool = False) -> None:
    """Sum every parameter's gradient over the domain (one flat all-reduce); call after ``backward()``.

    Args:
        model: the sharded model.
        group: the domain's process group.
        average: divide by the number of ranks: for a loss each rank takes as the *mean* over its
            slices (the gradient of the volume's mean is the mean of the ranks' gradients).
    """
    domain = Domain.of(group)
    params = [p for p in model.parameters() if p.requires_grad]
    if domain.size == 1 or not params:
        return
    # A parameter may take no gradient on one rank and one on another (a layer whose work a thin shard
    # skips): every rank must reduce the same list, so the ones any rank has are reduced everywhere.
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    reduce_(has, domain, kind="grads")
    grads = []
    for p, n in zip(params, has.tolist()):
        if n and p.grad is None:
            p.grad = torch.zeros_like(p)
        if n:
            grads.append(p.grad)
    if not grads:
        return
    # in buckets of about _BUCKET_BYTES (as DDP): few collectives, and no flat copy of all gradients
    # at once on top of the step's peak
    bucket: list[Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None and (not bucket or size + g.numel() * g.element_size() <= _BUCKET_BYTES):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1).clone()
        reduce_(flat, domain, kind="grads")
        if average:
            flat /= domain.size
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def halo_bytes(model: nn.Module, shape: tuple[int, ...], size: int, rank: int, dtype: torch.dtype,
               forward_passes: int, input_grad: bool = True) -> int:
    """The halo bytes rank ``rank`` of ``size`` sends in one step, from the shapes alone.

    Each convolution with a depth extent, applied to a map (B, C_in, D_l, H_l, W_l) of its level, sends
    ``kernel // 2`` planes of ``B * C_in * H_l * W_l`` values to each neighbour (one for the end ranks,
    two inside) per forward evaluation, and as many back in backward (the adjoint) when its input needs
    a gradient. An IDMUNet's level comes from its core op's name (``down1.coupling0`` is level 1);
    stem and head are level 0.

    Args:
        model: the (sharded or not) network, an IDMUNet.
        shape: the full input shape (B, C, D, H, W).
        size: ranks ``R``.
        rank: which rank's bytes.
        dtype: the maps' dtype.
        forward_passes: evaluations of each convolution per step: 1 under plain autograd, 2 when
            the memory-efficient backward rebuilds (the core's couplings, the checkpointed stem,
            the head recomputed in the core's node).
        input_grad: whether the network input needs a gradient (the stem's first convolution's adjoint).
    """
    neighbours = (rank > 0) + (rank < size - 1)
    batch, _, _, height, width = shape
    names = dict(enumerate(getattr(model, "op_names", [])))
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv3d) or module.kernel_size[0] == 1:
            continue
        level = 0
        parts = name.split(".")
        if parts[0] == "core" and parts[1] == "ops":
            level = int("".join(ch for ch in names[int(parts[2])].split(".")[0] if ch.isdigit()))
        plane = batch * module.in_channels * (height >> level) * (width >> level) * (module.kernel_size[0] // 2)
        first = name == "stem.body.0"
        passes = forward_passes + (0 if first and not input_grad else 1)
        total += passes * neighbours * plane * torch.empty(0, dtype=dtype).element_size()
    return total


def counted() -> dict[str, int]:
    """The bytes this process sent so far, by kind (a copy of the counter)."""
    return dict(COUNTER)
