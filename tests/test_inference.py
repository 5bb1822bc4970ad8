"""The no-grad (sampling) forward: in place, in slabs, equal to the forward it replaces.

"Before" is the forward IDMUNet ran without a graph until the in-place path (stem, each core op's
``forward`` on fresh tensors, head). Where the in-place path runs the same operations in the same
order (sub-networks that fit the budget run their own modules; couplings add in place; resampling
per channel group) the outputs are bitwise equal. The slab path sums the GroupNorm statistics in
another order (slab moments combined in float64, against ATen's one float32 pass), so it equals
the whole-volume result to float32 rounding: ~2e-7 relative per sub-network, ~7e-7 through a whole
network of couplings; the bounds below are 1e-6.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import Tensor

from helpers import perturb, torch_threads
from idm3d import IDMUNet
from idm3d.invertible import AdditiveCoupling, InvertibleSequence, OrthogonalDownsample3d, OrthogonalUpsample3d
from idm3d.invertible.inplace import adjacent_join, group_moments, inference_budget, regroup_view
from idm3d.nets.inference import head_no_grad, stem_no_grad


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def before(net: IDMUNet, x: Tensor, t: Tensor) -> Tensor:
    """The no-grad forward before the in-place path: every op's ``forward`` on fresh tensors."""
    with torch.no_grad():
        emb = net.embed(x, t)
        return net.head(net.core._run((net._stem(x),), (emb,))[0])


def net_of(attention: str, memory_efficient: bool) -> IDMUNet:
    torch.manual_seed(0)
    net = IDMUNet(channels=16, levels=3, attention_levels=(False, True, True), attention=attention,
                  memory_efficient=memory_efficient)
    return perturb(net, 0, 0.05)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def max_rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = [(a, m) for a in ("channel", "spatial", "none") for m in (True, False)]


@pytest.mark.parametrize(("attention", "memory_efficient"), CASES)
def test_no_grad_forward_is_bitwise_the_old_one(attention: str, memory_efficient: bool) -> None:
    net = net_of(attention, memory_efficient)
    x, t = torch.randn(2, 1, 24, 16, 16), torch.tensor([10, 500])
    ref = before(net, x, t)
    x0 = x.clone()
    with torch.no_grad():
        out = net(x, t)
    with torch.inference_mode():
        out_inf = net(x, t)
    assert torch.equal(out, ref)
    assert torch.equal(out_inf, ref)
    assert torch.equal(x, x0)  # the caller's input is only read


@pytest.mark.parametrize(("attention", "memory_efficient"), CASES)
@pytest.mark.parametrize("slab_bytes", [3000, 7 * 4096 + 5])  # 1-2 and odd plane counts per slab
def test_slab_forward_equals_the_old_one(attention: str, memory_efficient: bool, slab_bytes: int) -> None:
    net = net_of(attention, memory_efficient)
    x, t = torch.randn(2, 1, 24, 16, 16), torch.tensor([10, 500])
    ref = before(net, x, t)
    for work in (0, 30000):  # everything recomputed; part of the hidden maps kept
        with torch.no_grad(), inference_budget(slab_bytes=slab_bytes, work_bytes=work):
            out = net(x, t)
        assert rel(out, ref) < 1e-6, (work, rel(out, ref))


@pytest.mark.parametrize("depth", [13, 24])
def test_slab_parts_equal_whole_volume_modules(depth: int) -> None:
    net = net_of("none", True)
    x = torch.randn(2, 1, depth, 16, 16)
    state = torch.randn(2, 16, depth, 16, 16)
    with torch.no_grad():
        stem_ref, head_ref = net.stem(x), net.head(state)
        with inference_budget(slab_bytes=5 * 16 * 16 * 16 * 4 * 2, work_bytes=0):
            assert max_rel(stem_no_grad(net.stem, x), stem_ref) < 1e-6
            assert max_rel(head_no_grad(net.head, state), head_ref) < 1e-6
        coupling = perturb(AdditiveCoupling(16, 8, cond_dim=net.embed_dim, flip=True), 1)
        emb = torch.randn(2, net.embed_dim)
        ref = coupling(state, emb)
        for work in (0, 2 * 8 * 16 * 16 * 4 * 5):
            with inference_budget(slab_bytes=3 * 16 * 16 * 16 * 4 * 2, work_bytes=work):
                out = coupling.forward_(state.clone(), emb)
            assert max_rel(out, ref) < 1e-6
        mean, rstd = group_moments(state[:, 3:11], 4, 1e-5)
        _, ref_mean, ref_rstd = torch.native_group_norm(state[:, 3:11].contiguous(), None, None, 2, 8,
                                                        depth * 256, 4, 1e-5)
        assert torch.allclose(mean, ref_mean, atol=1e-6)
        assert torch.allclose(rstd, ref_rstd, rtol=1e-6)


def test_resampling_in_place_is_bitwise_and_in_the_input_memory() -> None:
    down = perturb(OrthogonalDownsample3d(3), 2)
    up = perturb(OrthogonalUpsample3d(3), 3)
    base = torch.randn(2, 5, 8, 6, 4)
    x = base[:, 2:5]  # a channel block of a state: dense per sample
    ref = down(x)
    with torch.no_grad(), inference_budget(slab_bytes=8 * 6 * 4 * 4 * 2):  # one channel per group
        y = down.forward_(x.clone().contiguous(), )
        y_view = down.forward_(x)
    assert torch.equal(y, ref)
    assert torch.equal(y_view, ref)
    assert y_view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    with torch.no_grad():
        back = up.forward_(y_view)
    assert torch.equal(back, up(ref))
    assert back.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert regroup_view(torch.randn(4, 2, 3, 4, 4).transpose(0, 1), (2, 16, 3, 2, 2)) is None


def test_adjacent_join_only_for_neighbouring_blocks() -> None:
    base = torch.randn(2, 6, 4, 4, 4)
    joined = adjacent_join(base[:, :2], base[:, 2:6])
    assert joined is not None
    assert torch.equal(joined, base)
    assert adjacent_join(base[:, :2], base[:, 3:6]) is None
    assert adjacent_join(base[:, :2], torch.randn(2, 4, 4, 4, 4)) is None


def test_in_place_path_engages_only_without_grad() -> None:
    net = net_of("channel", True)
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([3])
    with mock.patch.object(InvertibleSequence, "forward_", autospec=True,
                           side_effect=InvertibleSequence.forward_) as spy:
        out = net(x, t)
        assert out.requires_grad
        assert spy.call_count == 0
        net.memory_efficient = False
        net(x, t).sum().backward()
        assert spy.call_count == 0
        with torch.no_grad():
            net(x, t)
        with torch.inference_mode():
            net(x, t)
        assert spy.call_count == 2


def test_segment_no_grad_call_leaves_the_callers_state_alone() -> None:
    seg = perturb(InvertibleSequence([AdditiveCoupling(4, 4), AdditiveCoupling(4, 4, flip=True)]), 4)
    x = torch.randn(2, 4, 5, 6, 7)
    x0 = x.clone()
    with torch.enable_grad():
        ref = seg(x).detach()
    with torch.no_grad():
        out = seg(x)
    assert torch.equal(out, ref)
    assert torch.equal(x, x0)


def test_inference_budget_validates_and_restores() -> None:
    from idm3d.invertible.inplace import budget

    old = budget()
    with inference_budget(slab_bytes=10):
        assert budget().slab_bytes == 10
        assert budget().work_bytes == old.work_bytes
    assert budget() == old
    with pytest.raises(ValueError, match="slab_bytes"), inference_budget(slab_bytes=0):
        pass


def test_no_grad_peak_is_the_state_plus_a_budget_of_working_maps() -> None:
    """Live tensors of a 64³ ``IDMUNet()`` call, in T (its 32-channel full-resolution state).

    The in-place call holds the state, ``work_bytes`` of kept hidden slabs and a few slabs; the call it
    replaces held fresh maps for every op's output (2.5 T here, 3.5 T of RSS at 256³).
    """
    from test_memory_peak import LiveBytes

    torch.manual_seed(0)
    net = IDMUNet()
    x, t = torch.randn(1, 1, 64, 64, 64), torch.tensor([5])
    unit = 32 * 64**3 * 4
    peaks = {}
    with torch.no_grad(), inference_budget(slab_bytes=unit // 32, work_bytes=unit // 8):
        for name, call in (("before", lambda: before(net, x, t)), ("in place", lambda: net(x, t))):
            mode = LiveBytes()
            with mode:
                call()
            peaks[name] = mode.peak / unit
    # state 1 + kept hidden slabs 1/8 + slabs (input, hidden, output of a slab: ~5/32) + the output 1/32
    assert peaks["in place"] < 1 + 1 / 8 + 6 / 32 + 1 / 32, peaks
    assert peaks["before"] > 2, peaks
