"""A memory-efficient segment keeps what its layers computed at forward and replays it in the rebuild.

One process, no collectives: a toy layer counts how often it computes its "statistic" (what a
depth-sharded layer would compute with a collective). In a memory-efficient segment the rebuild in
backward replays the forward's value (no second computation), a module evaluated twice in one op
computes again, and the gradients equal plain autograd's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from idm3d.invertible import AdditiveCoupling, InvertibleSequence
from idm3d.invertible.record import keep, replayed


class Scaled(nn.Module):
    """``conv(x) * s``, ``s`` a no-grad statistic of ``x`` kept for the rebuild (as a sharded GroupNorm's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 1)
        self.computed = 0

    def forward(self, x: Tensor) -> Tensor:
        s = replayed(self)
        if s is None:
            self.computed += 1
            s = x.detach().square().mean() + 1.0
            keep(self, s)
        return self.conv(x) * s


class Twice(nn.Module):
    """One module applied twice: two values in one op's slot, none of which can be replayed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = Scaled(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.inner(x))


def _segment(memory_efficient: bool) -> tuple[InvertibleSequence, Scaled]:
    torch.manual_seed(0)
    ops = [AdditiveCoupling(4, flip=i % 2 == 1) for i in range(3)]
    for op in ops[:2]:
        op.net = Scaled(2)
    ops[2].net = Twice(2)
    seq = InvertibleSequence(ops, memory_efficient=memory_efficient).double()
    return seq, Scaled(4).double()


def _step(memory_efficient: bool) -> tuple[list[Tensor], list[int]]:
    seq, head = _segment(memory_efficient)
    x = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    seq(x, head=head).square().sum().backward()
    grads = [x.grad, *(p.grad for p in seq.parameters()), *(p.grad for p in head.parameters())]
    computed = [m.computed for m in (*seq.modules(), *head.modules()) if isinstance(m, Scaled)]
    return grads, computed


def test_the_rebuild_replays_what_the_forward_kept():
    grads, computed = _step(memory_efficient=True)
    ref_grads, ref_computed = _step(memory_efficient=False)
    # plain autograd computes each once; memory-efficient, the rebuild replays the two single-use
    # layers and the head, and the layer used twice in its op computes again (2 forward + 2 rebuild)
    assert ref_computed == [1, 1, 2, 1]
    assert computed == [1, 1, 4, 1]
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_outside_a_segment_node_nothing_is_kept_or_replayed():
    layer = Scaled(2).double()
    x = torch.randn(1, 2, 2, 2, 2, dtype=torch.float64)
    layer(x)
    layer(x)
    assert replayed(layer) is None
    assert layer.computed == 2
