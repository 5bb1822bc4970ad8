"""The exactness properties, on every device: CPU always, CUDA where present (the ``device`` fixture).

The same claims the per-module test files make on CPU, gathered so that ``pytest -m cuda`` on a GPU
machine (benchmarks/gpu_check.sh, first step) checks them where the kernels differ (cuDNN, cuBLAS,
cuSOLVER instead of oneDNN, MKL):

- memory-efficient IDMUNet gradients equal plain autograd in fp64 to 1e-10 of the gradient scale;
- every invertible module type inverts exactly (fp64 to 1e-10; fp32 to 1e-5, TF32 included);
- SlabConv3d equals Conv3d, forward and backward, with several slabs;
- the batched ``solve`` / ``logabsdet`` the attention uses are right at attention sizes;
- an IDMUNet step under bf16 autocast runs and stays finite.

Models and inputs are built on CPU from seeded generators, then moved: both devices see the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import perturb, torch_threads
from idm3d import IDMUNet
from idm3d.invertible import (
    AdditiveCoupling,
    Apply,
    ChannelMerge,
    ChannelSplit,
    InvertibleAttention3d,
    InvertibleChannelMix3d,
    InvertibleModule,
    InvertibleSequence,
    OrthogonalDownsample3d,
    OrthogonalUpsample3d,
    gradient_check,
    linalg,
)
from idm3d.invertible.slab_conv import SlabConv3d, slab_conv3d

COND_DIM = 6
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a shared 2-core machine: extra threads only spin against each other.
    with torch_threads(1):
        yield


def _randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _group_rel_error(a: list[Tensor], b: list[Tensor]) -> float:
    """|a - b| / |b| over a group of tensors taken together (a vanishing gradient holds only noise)."""
    diff = torch.stack([(u - v).norm() for u, v in zip(a, b)]).norm()
    return float(diff / torch.stack([v.norm() for v in b]).norm())


# ---------------------------------------------------------------------------------------------- IDMUNet

UNET_CONFIGS = {
    # levels, blocks, attention, attention_levels, bookends, down_fraction
    "channel_attention": (3, 2, "channel", (False, True, True), True, 0.25),
    "spatial_attention": (3, 1, "spatial", (False, False, True), False, 0.5),
}


def _unet(config: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> IDMUNet:
    levels, blocks, attention, att_levels, bookends, down_fraction = UNET_CONFIGS[config]
    torch.manual_seed(seed)
    net = IDMUNet(
        in_channels=2,
        out_channels=1,
        channels=8,
        levels=levels,
        blocks_per_level=blocks,
        attention=attention,
        attention_levels=att_levels,
        bookends=bookends,
        down_fraction=down_fraction,
    ).to(dtype)
    return perturb(net, seed, 0.05).to(device)


@pytest.mark.parametrize("config", list(UNET_CONFIGS))
def test_idm_unet_memory_efficient_gradients_equal_plain_fp64(device: torch.device, config: str) -> None:
    net = _unet(config, torch.float64, device)
    x, weight = _randn(2, 2, 8, 8, 8, seed=1).to(device), _randn(2, 1, 8, 8, 8, seed=2).to(device)
    t = torch.tensor([17, 640], device=device)

    def grads(memory_efficient: bool) -> list[Tensor]:
        net.memory_efficient = memory_efficient
        leaf = x.clone().requires_grad_(True)
        return list(torch.autograd.grad((net(leaf, t) * weight).sum(), [leaf, *net.parameters()]))

    efficient, plain = grads(True), grads(False)
    assert all(g.device.type == device.type for g in efficient)
    assert _group_rel_error(efficient[:1], plain[:1]) <= 1e-10
    assert _group_rel_error(efficient[1:], plain[1:]) <= 1e-10
    assert max(net.reconstruction_error(x, t).values()) <= 1e-10


def test_idm_unet_bf16_autocast_step(device: torch.device) -> None:
    """Forward and backward under bf16 autocast (as ``--precision bf16`` trains): finite, fp32 state kept."""
    net = _unet("channel_attention", torch.float32, device)
    x = _randn(2, 2, 16, 16, 16, dtype=torch.float32, seed=3).to(device)
    t = torch.tensor([5, 900], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = net(x, t)
    assert out.shape == (2, 1, 16, 16, 16)
    loss = out.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)  # parameters stay fp32 under autocast


# ------------------------------------------------------------------------------------ invertible modules

# name -> (factory, input shape, takes a conditioning vector)
MODULES: dict[str, tuple[Callable[[], InvertibleModule], tuple[int, ...], bool]] = {
    "coupling": (lambda: AdditiveCoupling(4), (2, 4, 8, 8, 8), False),
    "coupling_cond_flip": (lambda: AdditiveCoupling(4, cond_dim=COND_DIM, flip=True), (2, 4, 8, 8, 8), True),
    "down_cayley": (lambda: OrthogonalDownsample3d(2, "cayley"), (2, 2, 8, 8, 8), False),
    "down_exp": (lambda: OrthogonalDownsample3d(2, "exp"), (2, 2, 8, 8, 8), False),
    "up_cayley": (lambda: OrthogonalUpsample3d(2, "cayley"), (2, 16, 4, 4, 4), False),
    "up_exp": (lambda: OrthogonalUpsample3d(2, "exp"), (2, 16, 4, 4, 4), False),
    "mix_cayley": (lambda: InvertibleChannelMix3d(6, "cayley"), (2, 6, 8, 8, 8), False),
    "mix_exp": (lambda: InvertibleChannelMix3d(6, "exp"), (2, 6, 8, 8, 8), False),
    "split_merge": (
        lambda: InvertibleSequence(
            [ChannelSplit((2, 3)), Apply(AdditiveCoupling(2), index=0), AdditiveCoupling(3), ChannelMerge((2, 3))]
        ),
        (2, 5, 4, 4, 4),
        False,
    ),
}


def _attention(variant: str, alternating: bool, seed: int = 0) -> InvertibleAttention3d:
    """Random (far from initial) attention, as tests/test_attention.py makes it, 2 heads, conditioned."""
    torch.manual_seed(seed)
    module = InvertibleAttention3d(4, variant=variant, heads=2, cond_dim=COND_DIM, channel_alternating=alternating)
    with torch.no_grad():
        for lin in (module.to_q, module.to_k):
            lin.weight.normal_(0.0, 1.0)
        module.temperature.uniform_(1.0, 4.0)
        module.scale_logit.uniform_(-0.5, 0.5)
        module.film.weight.normal_(0.0, 0.3)
        module.film.bias.normal_(0.0, 0.1)
    return module


for _variant in ("channel", "spatial"):
    for _alt in (False, True):
        MODULES[f"attention_{_variant}{'_alt' if _alt else ''}"] = (
            lambda v=_variant, a=_alt: _attention(v, a),
            (2, 4, 4, 4, 4),
            True,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_round_trip(device: torch.device, name: str, dtype: torch.dtype) -> None:
    factory, shape, has_cond = MODULES[name]
    torch.manual_seed(0)
    fresh = factory().to(dtype).to(device)
    module = perturb(factory().to(dtype), 0).to(device)
    x = _randn(*shape, dtype=dtype, seed=4).to(device)
    cond = (_randn(shape[0], COND_DIM, dtype=dtype, seed=5).to(device),) if has_cond else ()
    with torch.no_grad():
        y = module(x, *cond)
        assert y.device.type == device.type
        assert (y - fresh(x, *cond)).abs().max() > 1e-2  # the perturbation changed the map
        err = float((module.inverse(y, *cond) - x).abs().max())
        # fp32 on a GPU: cuDNN may run fp32 convolutions in TF32 (torch.backends.cudnn.allow_tf32, on
        # by default), which the orthogonal resampling's grouped convolutions would feel first.
        assert err <= TOL[dtype], f"{name} round trip {err:.3g} on {device} (cudnn TF32: see docs/gpu/README.md)"


@pytest.mark.parametrize("variant", ["channel", "spatial"])
def test_attention_memory_efficient_gradients(device: torch.device, variant: str) -> None:
    mods = [_attention(variant, alt, seed=i).double().to(device) for i, alt in enumerate((False, True))]
    segment = InvertibleSequence(mods, memory_efficient=True)
    x = _randn(2, 4, 4, 4, 4, seed=6).to(device)
    cond = _randn(2, COND_DIM, seed=7).to(device)
    errors = gradient_check(segment, x, cond)
    assert max(errors.values()) <= 1e-10, errors


# ------------------------------------------------------------------------------------------ slab conv


def test_slab_conv_equals_conv3d(device: torch.device) -> None:
    """Several slabs of 3 planes (the slab size given explicitly), fp64, forward and every gradient."""
    x = _randn(2, 4, 11, 6, 5, seed=8).to(device).requires_grad_(True)
    w = _randn(6, 2, 3, 3, 3, seed=9).to(device).requires_grad_(True)
    b = _randn(6, seed=10).to(device).requires_grad_(True)
    plane = x.shape[0] * (x.shape[1] + w.shape[0]) * x.shape[3] * x.shape[4] * x.element_size()
    y = slab_conv3d(x, w, b, groups=2, slab_bytes=5 * plane)  # 3 output planes + 2 halo planes per slab
    assert type(y.grad_fn).__name__ == "_SlabConv3dFunctionBackward"  # really split
    ref = F.conv3d(x, w, b, padding=1, groups=2)
    grad = _randn(*ref.shape, seed=11).to(device)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, [x, w, b], grad), torch.autograd.grad(ref, [x, w, b], grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_slab_conv_module_matches_conv3d(device: torch.device) -> None:
    torch.manual_seed(2)
    plain = torch.nn.Conv3d(3, 4, 3, padding=1).double()
    slab = SlabConv3d(3, 4, 3, slab_bytes=1).double()  # one plane per slab
    slab.load_state_dict(plain.state_dict())
    plain, slab = plain.to(device), slab.to(device)
    x = _randn(2, 3, 6, 5, 4, seed=12).to(device)
    torch.testing.assert_close(slab(x), plain(x), rtol=0, atol=1e-12)
    slab(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(slab.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slab.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ linalg


def _attention_like(batch: tuple[int, ...], n: int, seed: int) -> Tensor:
    """``s * I + (1 - s) * softmax(...)``-like matrices: row-stochastic plus a diagonal, as the attention."""
    logits = 3.0 * _randn(*batch, n, n, seed=seed)
    return 0.5 * torch.eye(n, dtype=torch.float64) + 0.5 * torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("n", [8, 256])  # 256: above the ~150 where CPU batched LU faulted multi-threaded
def test_batched_solve_and_logabsdet(device: torch.device, n: int) -> None:
    a = _attention_like((2, 2), n, seed=13)
    b = _randn(2, 2, n, 3, seed=14)
    got = linalg.solve(a.to(device), b.to(device))
    assert got.device.type == device.type
    torch.testing.assert_close(a.to(device) @ got, b.to(device), rtol=0, atol=1e-10)
    torch.testing.assert_close(got.cpu(), torch.linalg.solve(a, b), rtol=1e-10, atol=1e-10)
    logdet = linalg.logabsdet(a.to(device))
    torch.testing.assert_close(logdet.cpu(), torch.linalg.slogdet(a).logabsdet, rtol=1e-10, atol=1e-10)
