"""The memory-efficient backward's peak: which feature maps are alive at once, bounded from their sizes.

A dispatch mode records the storage of every tensor an aten op returns and, after each op, sums
the bytes of those still alive: the live tensors of the step (kernel-internal scratch, such as a
convolution's workspace, is not a tensor and not counted; it depends on the oneDNN algorithm, not
on this code). The bounds are counts of full-resolution maps, from the shapes of the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import perturb, torch_threads
from idm3d import IDMUNet
from idm3d.invertible import AdditiveCoupling, InvertibleSequence
from idm3d.invertible.norm_act import group_norm_silu

E = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Live-tensor accounting does not depend on threads; small convolutions only spin on a shared machine.
    with torch_threads(1):
        yield


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors made under the mode that are alive together (checked after each op)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and in-place results share an argument's memory: only new storages count
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in given:
                storage = t.untyped_storage()
                self.refs.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


class Head(nn.Module):
    """An output block as IDMUNet's: GroupNorm-SiLU-Conv to one channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.conv = nn.Conv3d(channels, 1, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(h)))


def level0_segment(channels: int, blocks: int, memory_efficient: bool) -> InvertibleSequence:
    """Full-resolution couplings as IDMUNet's level 0: sub-networks half as wide as the state.

    The segment's ``memory_efficient`` alone decides whether the sub-networks take their lean path.
    """
    ops = [AdditiveCoupling(channels, channels // 2, cond_dim=E, flip=bool(i % 2)) for i in range(blocks)]
    return perturb(InvertibleSequence(ops, memory_efficient=memory_efficient), 0, 0.1)


def step_peak(seg: InvertibleSequence, x: Tensor, cond: Tensor, head: nn.Module) -> int:
    """Peak live-tensor bytes of forward and backward (tensors the step makes, parameter gradients included)."""
    mode = LiveBytes()
    with mode:
        seg(x, cond, head=head).square().mean().backward()
    return mode.peak


@pytest.mark.parametrize("batch", [1, 2])
def test_segment_backward_peak_bounded_by_map_count(batch: int) -> None:
    channels, size, blocks = 16, 16, 4
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, size, requires_grad=True)
    cond = torch.randn(batch, E, requires_grad=True)
    seg = level0_segment(channels, blocks, memory_efficient=True)
    head = Head(channels)
    peak = step_peak(seg, x, cond, head)
    state = x.nbytes  # one full-resolution map of the state
    hidden = state // 2  # one map of a sub-network (half the channels)
    params = sum(p.nbytes for p in (*seg.parameters(), *head.parameters()))
    # Alive at the worst moment, the FiLM-GroupNorm-SiLU backward of a coupling's sub-network:
    # the state and its gradient, one map each, rebuilt in place all along (the segment output
    # and the head's input gradient); four hidden maps: the node's input (the first convolution's
    # output), the incoming gradient, the rebuilt pre-activation that becomes its gradient, the
    # input gradient (the first convolution's input is rebuilt only when its backward runs); the
    # parameter gradients and their running sums. (Before the in-place backward, the same
    # accounting found about 9 state maps at IDMUNet's level 0.)
    bound = 2 * state + 4 * hidden + 2 * params
    assert peak <= bound, (peak / state, bound / state)
    # Under plain autograd the same step keeps every block's activations (several maps per block).
    plain = step_peak(level0_segment(channels, blocks, memory_efficient=False), x, cond, head)
    assert plain > 1.5 * peak, (plain / state, peak / state)


def test_idmunet_step_peak_bounded_by_map_count() -> None:
    """A whole IDMUNet training step: the backward never holds more than a handful of level-0 maps."""
    torch.manual_seed(0)
    net = IDMUNet(channels=8, levels=2, blocks_per_level=2, attention_levels=(False, True))
    perturb(net, 0, 0.05)
    size = 16
    x = torch.randn(2, 1, size, size, size)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (2,))
    loss = F.mse_loss(net(x, t), noise)
    mode = LiveBytes()
    with mode:
        loss.backward()
    state = 2 * 8 * size**3 * 4  # one full-resolution map of the core (batch 2, 8 channels, fp32)
    params = sum(p.nbytes for p in net.parameters())
    # as for a segment (level 0's sub-networks are half as wide as the state: 4 channels); the
    # implementation before the in-place backward needed 9.0 maps here by the same accounting
    assert mode.peak <= 2 * state + 5 * state // 2 + 2 * params, mode.peak / state


def test_reused_output_memory_makes_a_second_backward_fail_loudly() -> None:
    """Behind a head the segment rebuilds activations in its output's memory: retain_graph cannot reuse it."""
    torch.manual_seed(0)
    seg = level0_segment(8, 2, memory_efficient=True)
    x = torch.randn(1, 8, 8, 8, 8, requires_grad=True)
    cond = torch.randn(1, E, requires_grad=True)
    loss = seg(x, cond, head=Head(8)).square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_head_inside_segment_matches_head_after_it(memory_efficient: bool) -> None:
    torch.manual_seed(1)
    seg = level0_segment(8, 3, memory_efficient=memory_efficient).double()
    head = perturb(Head(8).double(), 1, 0.1)
    x = torch.randn(2, 8, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, E, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
    inputs = [x, cond, *seg.parameters(), *head.parameters()]
    inside = torch.autograd.grad((seg(x, cond, head=head) * weight).sum(), inputs)
    seg.memory_efficient = False
    after = torch.autograd.grad((head(seg(x, cond)) * weight).sum(), inputs)
    for a, b in zip(inside, after):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("film", [False, True], ids=["plain", "film"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["same_layout", "channels_last"])
@pytest.mark.parametrize("layout", ["contiguous", "channel_view", "channels_last"])
def test_group_norm_silu_equals_the_composite(film: bool, channels_last: bool, layout: str) -> None:
    torch.manual_seed(2)
    norm = perturb(nn.GroupNorm(4, 8).double(), 2, 0.5)
    base = torch.randn(2, 12, 6, 5, 4, dtype=torch.float64)
    x = {
        "contiguous": base[:, :8].contiguous(),
        "channel_view": base[:, 2:10],  # a coupling's half: a view with the state's strides
        "channels_last": base[:, :8].contiguous(memory_format=torch.channels_last_3d),
    }[layout].requires_grad_(True)
    scale = torch.randn(2, 8, 1, 1, 1, dtype=torch.float64, requires_grad=True) if film else None
    shift = torch.randn(2, 8, 1, 1, 1, dtype=torch.float64, requires_grad=True) if film else None
    ref = norm(x)
    ref = F.silu(torch.addcmul(shift, ref, scale) if film else ref)
    out = group_norm_silu(x, norm, scale, shift, channels_last=channels_last)
    assert torch.equal(out, ref)  # the same kernels: bitwise equal
    assert out.is_contiguous(memory_format=torch.channels_last_3d) or not channels_last
    grad = torch.randn_like(ref)
    inputs = [x, norm.weight, norm.bias, *([scale, shift] if film else [])]
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_group_norm_silu_rejects_bad_film() -> None:
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="scale and shift"):
        group_norm_silu(x, norm, torch.ones(1, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="scale must have shape"):
        group_norm_silu(x, norm, torch.ones(1, 3, 1, 1, 1), torch.ones(1, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="expected"):
        group_norm_silu(torch.randn(1, 3, 4, 4, 4), norm)


def test_rebuilt_convolution_input_refuses_a_modified_source() -> None:
    """The first convolution's input is rebuilt from the sub-network's input: writing that input first is an error."""
    from idm3d.invertible import ConditionedConvNet, memory_efficient_mode

    net = perturb(ConditionedConvNet(4, 4, 4, cond_dim=E), 3, 0.1)
    x = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    h = x * 1.0
    with memory_efficient_mode():
        out = net(h, torch.randn(1, E))
    h.add_(1.0)
    with pytest.raises(RuntimeError, match=r"in ?place"):
        out.sum().backward()
