"""InvertibleSequence: deep round trips and memory-efficient gradients against plain autograd."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from helpers import perturb, torch_threads
from idm3d.invertible import (
    AdditiveCoupling,
    Apply,
    ChannelMerge,
    ChannelSplit,
    ConditionedConvNet,
    InvertibleChannelMix3d,
    InvertibleSequence,
    OrthogonalDownsample3d,
    OrthogonalUpsample3d,
    gradient_check,
)

DTYPES = [torch.float32, torch.float64]
SEEDS = [0, 1, 2]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
E = 6  # conditioning vector size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: extra threads only spin against each other.
    with torch_threads(1):
        yield


def unet_segment(end_split: bool = False) -> InvertibleSequence:
    """A small U-Net-shaped segment, 4 channels in: 13 ops (+1 split), every op type, conditioned."""
    ops: list[nn.Module] = [
        AdditiveCoupling(4, cond_dim=E),
        AdditiveCoupling(4, cond_dim=E, flip=True),
        ChannelSplit((2, 2)),  # (skip, down)
        OrthogonalDownsample3d(2, "cayley"),  # (skip, 16 @ 1/2)
        Apply(AdditiveCoupling(2, flip=True), index=0),  # works on the skip below the top
        AdditiveCoupling(16, cond_dim=E),
        InvertibleChannelMix3d(16, "cayley"),
        AdditiveCoupling(16, cond_dim=E, flip=True),
        OrthogonalUpsample3d(2, "exp"),  # (skip, 2 @ full)
        ChannelMerge((2, 2)),
        AdditiveCoupling(4, cond_dim=E),
        InvertibleChannelMix3d(4, "exp"),
        AdditiveCoupling(4, flip=True),  # unconditioned: ignores cond
    ]
    if end_split:
        ops.append(ChannelSplit((1, 3)))
    return InvertibleSequence(ops)


def _state(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def max_err(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(_state(a), _state(b), strict=True))


@pytest.mark.parametrize("end_split", [False, True], ids=["tensor_out", "tuple_out"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_deep_segment_round_trip(dtype: torch.dtype, seed: int, end_split: bool) -> None:
    torch.manual_seed(seed)
    # 0.05: far from identity (outputs move by O(1)) while activations stay unit-scale.
    seg = perturb(unet_segment(end_split).to(dtype), seed, 0.05)
    x, cond = torch.randn(2, 4, 16, 16, 16, dtype=dtype), torch.randn(2, E, dtype=dtype)
    with torch.no_grad():
        y = seg(x, cond)
        assert isinstance(y, tuple) == end_split
        assert float((torch.cat(_state(y), dim=1) - x).abs().max()) > 0.1  # far from the identity
        assert max_err(seg.inverse(y, cond), x) <= TOL[dtype]


def grads_of(
    seg: InvertibleSequence,
    x: Sequence[Tensor],
    cond: Sequence[Tensor],
    memory_efficient: bool,
    seed: int,
) -> dict[str, list[Tensor | None]]:
    """``.grad`` of inputs, conditioning and parameters after ``loss.backward()`` in one mode."""
    seg.memory_efficient = memory_efficient
    seg.zero_grad(set_to_none=True)
    xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in x]
    cs = [c.detach().clone().requires_grad_(c.requires_grad) for c in cond]
    outs = _state(seg(xs[0] if len(xs) == 1 else tuple(xs), *cs))
    # Make sure the mode under test really ran (every output comes from the custom autograd function).
    assert all(type(o.grad_fn).__name__ == "_SegmentFunctionBackward" for o in outs) == memory_efficient
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    return {
        "input": [t.grad for t in xs],
        "cond": [c.grad for c in cs],
        "params": [None if p.grad is None else p.grad.clone() for p in seg.parameters()],
    }


def assert_grads_match(seg: InvertibleSequence, x: Sequence[Tensor], cond: Sequence[Tensor], tol: float) -> None:
    """Memory-efficient vs plain ``.grad``: same ``None`` pattern; each tensor's error <= tol * its group's norm.

    (Per group, not per tensor: a tensor whose true gradient vanishes holds rounding noise only.)
    """
    me, plain = grads_of(seg, x, cond, True, 7), grads_of(seg, x, cond, False, 7)
    for group in ("input", "cond", "params"):
        assert [g is None for g in me[group]] == [g is None for g in plain[group]], group
        ref = math.hypot(*(float(g.norm()) for g in plain[group] if g is not None))
        for a, b in zip(me[group], plain[group]):
            if b is not None:
                assert ref > 0
                assert float((a - b).norm()) <= tol * ref, group


def check_both_ways(seg: InvertibleSequence, x: Sequence[Tensor], cond: Sequence[Tensor], tol: float) -> None:
    errors = gradient_check(seg, x[0] if len(x) == 1 else tuple(x), *cond, seed=3)
    assert max(errors.values()) <= tol, errors
    assert_grads_match(seg, x, cond, tol)


# name -> (ops, input shape, takes a conditioning vector). Each module is followed by a channel mix, so
# its backward_pass gets an output gradient and an output that it did not make itself.
MODULES: dict[str, tuple[Callable[[], list[nn.Module]], tuple[int, ...], bool]] = {
    "coupling": (lambda: [AdditiveCoupling(4), InvertibleChannelMix3d(4)], (2, 4, 8, 8, 8), False),
    "coupling_cond_flip": (
        lambda: [AdditiveCoupling(4, cond_dim=E, flip=True), InvertibleChannelMix3d(4)],
        (2, 4, 8, 8, 8),
        True,
    ),
    "down_cayley": (lambda: [OrthogonalDownsample3d(2, "cayley"), InvertibleChannelMix3d(16)], (2, 2, 8, 8, 8), False),
    "down_exp": (lambda: [OrthogonalDownsample3d(2, "exp"), InvertibleChannelMix3d(16)], (2, 2, 8, 8, 8), False),
    "up_cayley": (lambda: [OrthogonalUpsample3d(2, "cayley"), InvertibleChannelMix3d(2)], (2, 16, 4, 4, 4), False),
    "up_exp": (lambda: [OrthogonalUpsample3d(2, "exp"), InvertibleChannelMix3d(2)], (2, 16, 4, 4, 4), False),
    "mix_cayley": (lambda: [InvertibleChannelMix3d(4, "cayley"), AdditiveCoupling(4)], (2, 4, 8, 8, 8), False),
    "mix_exp": (lambda: [InvertibleChannelMix3d(4, "exp"), AdditiveCoupling(4)], (2, 4, 8, 8, 8), False),
    "split_merge": (
        lambda: [ChannelSplit((1, 3)), Apply(AdditiveCoupling(3)), ChannelMerge((1, 3)), AdditiveCoupling(4)],
        (2, 4, 8, 8, 8),
        False,
    ),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_gradients(name: str, dtype: torch.dtype, seed: int) -> None:
    ops, shape, has_cond = MODULES[name]
    torch.manual_seed(seed)
    seg = perturb(InvertibleSequence(ops()).to(dtype), seed, 0.1)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    cond = [torch.randn(shape[0], E, dtype=dtype, requires_grad=True)] if has_cond else []
    check_both_ways(seg, [x], cond, TOL[dtype])


@pytest.mark.parametrize("end_split", [False, True], ids=["tensor_out", "tuple_out"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_deep_segment_gradients(dtype: torch.dtype, seed: int, end_split: bool) -> None:
    torch.manual_seed(seed)
    seg = perturb(unet_segment(end_split).to(dtype), seed, 0.05)
    x = torch.randn(2, 4, 8, 8, 8, dtype=dtype, requires_grad=True)
    cond = torch.randn(2, E, dtype=dtype, requires_grad=True)
    check_both_ways(seg, [x], [cond], TOL[dtype])


@pytest.mark.parametrize(
    ("x_grad", "cond_grad", "params_grad"),
    [(False, True, True), (True, False, True), (False, False, True), (True, True, False), (False, True, False)],
    ids=["no_input_grad", "no_cond_grad", "params_only", "frozen_params", "cond_only"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_partial_requires_grad(dtype: torch.dtype, x_grad: bool, cond_grad: bool, params_grad: bool) -> None:
    torch.manual_seed(0)
    seg = perturb(unet_segment().to(dtype), 0, 0.05)
    seg.requires_grad_(params_grad)
    x = torch.randn(2, 4, 8, 8, 8, dtype=dtype).requires_grad_(x_grad)
    cond = torch.randn(2, E, dtype=dtype).requires_grad_(cond_grad)
    me = grads_of(seg, [x], [cond], True, 0)
    assert (me["input"][0] is not None) == x_grad
    assert (me["cond"][0] is not None) == cond_grad
    assert all((g is not None) == params_grad for g in me["params"])
    assert_grads_match(seg, [x], [cond], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_shared_parameters_accumulate(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    c1, c2 = AdditiveCoupling(8, cond_dim=E), AdditiveCoupling(8, cond_dim=E)
    c2.net = c1.net  # the very same sub-network in two couplings
    down, up = OrthogonalDownsample3d(1), OrthogonalUpsample3d(1)
    up.weight = down.weight  # a tied kernel pair
    mix = InvertibleChannelMix3d(8)
    seg = perturb(InvertibleSequence([down, c1, mix, c2, up]).to(dtype), 0, 0.1)
    assert len(seg._unique_parameters()) == len(list(c1.parameters())) + 2
    x = torch.randn(2, 1, 8, 8, 8, dtype=dtype, requires_grad=True)
    cond = torch.randn(2, E, dtype=dtype, requires_grad=True)
    check_both_ways(seg, [x], [cond], TOL[dtype])
    # The shared gradient is the sum over both uses: one use alone gives a different one.
    both = grads_of(seg, [x], [cond], True, 0)["params"]
    c2.net = ConditionedConvNet(4, 4, 8, E).to(dtype)
    c2.net.load_state_dict(c1.net.state_dict())  # same values, separate tensors
    split = grads_of(seg, [x], [cond], True, 0)["params"]
    n_net = len(list(c1.net.parameters()))
    first_use = split[1 : 1 + n_net]  # down.weight.raw, then c1.net's
    second_use = split[-n_net:]
    for total, a, b in zip(both[1 : 1 + n_net], first_use, second_use):
        torch.testing.assert_close(total, a + b, rtol=TOL[dtype], atol=TOL[dtype] * float(total.abs().max()))
    assert any(float((a - b).abs().max()) > 1e-3 for a, b in zip(first_use, second_use))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_stack_input_passes_through(dtype: torch.dtype) -> None:
    """A tuple state whose lower element is returned untouched (an input that is also an output)."""
    torch.manual_seed(0)
    seg = perturb(InvertibleSequence([AdditiveCoupling(4, cond_dim=E), InvertibleChannelMix3d(4)]).to(dtype), 0, 0.1)
    skip = torch.randn(2, 3, 8, 8, 8, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 4, 8, 8, 8, dtype=dtype, requires_grad=True)
    cond = torch.randn(2, E, dtype=dtype, requires_grad=True)
    out = seg((skip, x), cond)
    assert torch.equal(out[0], skip)
    check_both_ways(seg, [skip, x], [cond], TOL[dtype])


def test_repeated_calls_and_retained_graph() -> None:
    """Two calls of one segment in one graph, and a second backward through a retained graph."""
    dtype = torch.float64
    torch.manual_seed(0)
    seg = perturb(unet_segment().to(dtype), 0, 0.05)
    x1, x2 = (torch.randn(1, 4, 8, 8, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    cond = torch.randn(1, E, dtype=dtype, requires_grad=True)
    grads = []
    for mode in (True, False):
        seg.memory_efficient = mode
        loss = (seg(x1, cond) * seg(x2, cond).flip(-1)).sum()
        params = list(seg.parameters())
        g = torch.autograd.grad(loss, [x1, x2, cond, *params], retain_graph=True)
        again = torch.autograd.grad(loss, [x1, x2, cond, *params])
        for a, b in zip(g, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        grads.append(g)
    scale = max(float(b.abs().max()) for b in grads[1])  # some true gradients vanish: compare on one scale
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_reconstruction_error(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    seg = perturb(unet_segment(end_split=True).to(dtype), 0, 0.05)
    x, cond = torch.randn(2, 4, 16, 16, 16, dtype=dtype), torch.randn(2, E, dtype=dtype)
    errors = seg.reconstruction_error(x, cond)
    assert len(errors) == len(seg.ops)
    assert min(errors) >= 0
    if dtype == torch.float64:
        assert max(errors) < 1e-10
    else:
        # Rounding is real in fp32 (the Haar kernels are irrational), but small.
        assert 0 < max(errors) < 1e-5
    # The first entry is the whole segment's drift: what the full inverse gives.
    with torch.no_grad():
        assert errors[0] == pytest.approx(max_err(seg.inverse(seg(x, cond), cond), x), rel=0, abs=1e-12)


@pytest.mark.parametrize("end_split", [False, True], ids=["tensor_out", "tuple_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_inference_matches_memory_efficient(dtype: torch.dtype, end_split: bool) -> None:
    torch.manual_seed(0)
    seg = perturb(unet_segment(end_split).to(dtype), 0, 0.05)
    x, cond = torch.randn(2, 4, 8, 8, 8, dtype=dtype), torch.randn(2, E, dtype=dtype)
    with torch.no_grad():
        ref = _state(seg(x, cond))
    with torch.inference_mode():
        inf = _state(seg(x, cond))
    me = _state(seg(x.clone().requires_grad_(), cond))
    assert all(t.grad_fn is not None for t in me)  # the memory-efficient path did run
    seg.memory_efficient = False
    plain = _state(seg(x.clone().requires_grad_(), cond))
    for r, i, m, p in zip(ref, inf, me, plain, strict=True):
        assert torch.equal(r, i)
        assert torch.equal(r, m.detach())
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=TOL[dtype])
