"""A core that refuses misuse: no silent double backward, one memory-efficient switch, random layers replayed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from helpers import perturb
from idm3d import IDMUNet
from idm3d.invertible import (
    AdditiveCoupling,
    ChannelAttention3d,
    ConditionedConvNet,
    InvertibleAttention3d,
    InvertibleModule,
    InvertibleSequence,
    SpatialAttention3d,
    invertible_attention,
    memory_efficient_mode,
    norm_act,
)
from idm3d.invertible.slab_conv import slab_conv3d

E = 6
F64 = torch.float64


def couplings(memory_efficient: bool, channels: int = 8, blocks: int = 3, **kwargs) -> InvertibleSequence:
    ops = [AdditiveCoupling(channels, cond_dim=E, flip=bool(i % 2)) for i in range(blocks)]
    return perturb(InvertibleSequence(ops, memory_efficient=memory_efficient, **kwargs), 0, 0.1)


def small_unet(memory_efficient: bool) -> IDMUNet:
    torch.manual_seed(0)
    net = IDMUNet(channels=8, levels=2, blocks_per_level=1, attention_levels=(False, True))
    net.memory_efficient = memory_efficient
    return perturb(net, 0, 0.05)


def _segment_case(memory_efficient: bool) -> tuple[nn.Module, Callable[[], Tensor]]:
    torch.manual_seed(1)
    seg = couplings(memory_efficient).to(F64)
    x = torch.randn(2, 8, 6, 6, 6, dtype=F64, requires_grad=True)
    cond = torch.randn(2, E, dtype=F64, requires_grad=True)
    return seg, lambda: seg(x, cond).square().sum()


def _unet_case(memory_efficient: bool) -> tuple[nn.Module, Callable[[], Tensor]]:
    net = small_unet(memory_efficient).to(F64)
    x = torch.randn(2, 1, 8, 8, 8, dtype=F64)
    t = torch.tensor([3, 700])
    return net, lambda: net(x, t).square().mean()


CASES = {"segment": _segment_case, "idmunet": _unet_case}


def _penalty_backward(module: nn.Module, loss: Callable[[], Tensor]) -> list[Tensor | None]:
    """A gradient penalty's backward, ``d/dparams |dL/dparams|^2``: a double backward."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(), params, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    return [p.grad for p in params]


# ------------------------------------------------------------------ 1. double backward


@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_efficient_refuses_double_backward(case: str) -> None:
    module, loss = CASES[case](True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _penalty_backward(module, loss)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_graph_building_gradient_is_refused_not_left_unused(case: str) -> None:
    """``autograd.grad(..., create_graph=True, allow_unused=True)`` must not return None for the core's parameters."""
    module, loss = CASES[case](True)
    params = [p for p in module.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(loss(), params, create_graph=True, allow_unused=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_mode_supports_double_backward(case: str) -> None:
    module, loss = CASES[case](False)
    second = [g for g in _penalty_backward(module, loss) if g is not None]
    assert len(second) == len(list(module.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in second)
    assert any(float(g.abs().max()) > 0 for g in second)


def _fused_norm() -> tuple[Tensor, Tensor]:
    x = torch.randn(1, 4, 4, 4, 4, dtype=F64, requires_grad=True)
    return x, norm_act.group_norm_silu(x, nn.GroupNorm(2, 4).to(F64))


def _slab_conv() -> tuple[Tensor, Tensor]:
    x = torch.randn(1, 2, 6, 4, 4, dtype=F64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=F64, requires_grad=True)
    return x, slab_conv3d(x, w, slab_bytes=1)  # one plane per slab: the custom node runs


@pytest.mark.parametrize("build", [_fused_norm, _slab_conv], ids=["group_norm_silu", "slab_conv3d"])
def test_custom_nodes_refuse_double_backward(build: Callable[[], tuple[Tensor, Tensor]]) -> None:
    x, out = build()
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


# ------------------------------------------------------------------ 2. parameters saved at forward


def test_parameter_modified_between_forward_and_backward_is_refused() -> None:
    seg, loss = _segment_case(True)
    value = loss()
    with torch.no_grad():
        next(seg.parameters()).add_(1.0)  # e.g. an optimizer step before backward
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        value.backward()


def test_requires_grad_changed_between_forward_and_backward_is_refused() -> None:
    seg, loss = _segment_case(True)
    value = loss()
    seg.ops[1].module.net.conv1.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"op 1 .*parameters that take gradients"):
        value.backward()


# ------------------------------------------------------------------ 3. one memory-efficient switch


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the fused GroupNorm(-FiLM)-SiLU nodes built (one entry each)."""
    calls: list[int] = []
    original = norm_act._GroupNormSiLU.apply

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(norm_act._GroupNormSiLU, "apply", spy)
    return calls


def _all_grads(seg: InvertibleSequence, x: Tensor, cond: Tensor, weight: Tensor) -> list[Tensor]:
    x, cond = x.detach().requires_grad_(True), cond.detach().requires_grad_(True)
    return list(torch.autograd.grad((seg(x, cond) * weight).sum(), [x, cond, *seg.parameters()]))


@pytest.mark.parametrize("blocks", [1, 3])
def test_hand_built_segment_takes_the_lean_path_and_matches_plain(fused_calls: list[int], blocks: int) -> None:
    torch.manual_seed(2)
    seg = couplings(True, blocks=blocks).to(F64)
    x = torch.randn(2, 8, 6, 6, 6, dtype=F64)
    cond, weight = torch.randn(2, E, dtype=F64), torch.randn(2, 8, 6, 6, 6, dtype=F64)
    lean = _all_grads(seg, x, cond, weight)
    # in backward's rebuild, per coupling: both norms, and the first again to rebuild the input of
    # the first convolution instead of saving it
    assert len(fused_calls) == 3 * blocks
    fused_calls.clear()
    seg.memory_efficient = False
    plain = _all_grads(seg, x, cond, weight)
    assert not fused_calls  # plain modules everywhere
    scale = max(float(g.abs().max()) for g in plain)
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_idmunet_switch_drives_core_stem_and_head(fused_calls: list[int], memory_efficient: bool) -> None:
    net = small_unet(memory_efficient)
    assert net.memory_efficient is memory_efficient is net.core.memory_efficient
    net(torch.randn(1, 1, 8, 8, 8), torch.tensor([5])).square().sum().backward()
    # stem: forward and its checkpointed recomputation; head: one; each core coupling: three
    couplings_in_core = sum(isinstance(m, AdditiveCoupling) for m in net.modules())
    assert len(fused_calls) == (3 + 3 * couplings_in_core if memory_efficient else 0)


def test_lean_path_only_inside_the_mode(fused_calls: list[int]) -> None:
    net = ConditionedConvNet(4, 4, 4, cond_dim=E)
    x, cond = torch.randn(1, 4, 4, 4, 4, requires_grad=True), torch.randn(1, E)
    net(x, cond).sum().backward()
    assert not fused_calls
    with memory_efficient_mode():
        net(x, cond).sum().backward()
        with torch.no_grad():
            net(x, cond)  # no graph, nothing to save: the plain modules
        with memory_efficient_mode(False):
            net(x, cond)
    assert len(fused_calls) == 3  # two norms, and the first one's rebuild in backward


# ------------------------------------------------------------------ 4. the attention factory


@pytest.mark.parametrize(("variant", "cls"), [("channel", ChannelAttention3d), ("spatial", SpatialAttention3d)])
def test_attention_factory_builds_the_variant(variant: str, cls: type) -> None:
    module = invertible_attention(8, variant=variant, heads=2, cond_dim=4)
    assert type(module) is cls
    assert isinstance(module, InvertibleAttention3d)
    assert type(invertible_attention(8, variant, 2)) is cls
    with pytest.deprecated_call(match="invertible_attention"):
        old = InvertibleAttention3d(8, variant=variant, heads=2)
    assert type(old) is cls
    assert type(cls(8, heads=2)) is cls  # the classes themselves do not warn


def test_attention_factory_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        invertible_attention(8, variant="pixel")


# ------------------------------------------------------------------ 6. random layers


class DropoutNet(nn.Module):
    """A coupling sub-network with a random layer: conv, dropout, conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv3d(channels, channels, 3, padding=1), nn.Conv3d(channels, channels, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        return self.conv2(self.drop(torch.tanh(self.conv1(x)) * (1 + cond[0].mean())))


class NoisyShift(InvertibleModule):
    """``y = x + noise``, fresh noise per call: the base class's invert-then-recompute backward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        return x + self.gain * torch.randn_like(x)

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        return y - self.gain * torch.randn_like(y)


def random_segment(memory_efficient: bool, preserve: bool = True) -> InvertibleSequence:
    torch.manual_seed(3)
    ops: list[nn.Module] = []
    for i in range(3):
        coupling = AdditiveCoupling(8, flip=bool(i % 2))
        coupling.net = DropoutNet(4)
        ops += [coupling, NoisyShift(8)]
    return InvertibleSequence(ops, memory_efficient=memory_efficient, preserve_rng_state=preserve).to(F64).train()


class DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv3d(8, 1, 1), nn.Dropout(0.5)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(self.drop(h))


def _random_grads(
    seg: InvertibleSequence, head: nn.Module | None, seed: int = 7
) -> tuple[Tensor, Sequence[Tensor], Tensor]:
    """Output, gradients (input, cond, parameters) and the random state after backward, for one seed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, 4, dtype=F64, generator=gen, requires_grad=True)
    cond = torch.randn(2, E, dtype=F64, generator=gen, requires_grad=True)
    torch.manual_seed(seed)
    out = seg(x, cond) if head is None else seg(x, cond, head=head)
    after_forward = torch.get_rng_state()
    params = [*seg.parameters(), *(head.parameters() if head is not None else ())]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum(),
                                [x, cond, *params])
    if seg.preserve_rng_state:  # backward leaves the caller's stream alone
        assert torch.equal(torch.get_rng_state(), after_forward)
    return out.detach(), grads, after_forward


@pytest.mark.parametrize("with_head", [False, True], ids=["no_head", "head"])
def test_random_layers_replay_their_draws(with_head: bool) -> None:
    head = DropoutHead().to(F64) if with_head else None
    seg = random_segment(True)
    out, lean, state = _random_grads(seg, head)
    seg.memory_efficient = False
    ref, plain, ref_state = _random_grads(seg, head)
    assert torch.equal(out, ref)  # the same draws in forward
    assert torch.equal(state, ref_state)
    scale = max(float(g.abs().max()) for g in plain)
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def test_without_preserved_rng_state_the_rebuild_differs() -> None:
    """What the saved state prevents: a rebuild that draws anew gives other gradients."""
    seg = random_segment(True, preserve=False)
    _, unsaved, _ = _random_grads(seg, None)
    seg.memory_efficient = False
    _, plain, _ = _random_grads(seg, None)
    assert any(not torch.allclose(a, b) for a, b in zip(unsaved, plain))
