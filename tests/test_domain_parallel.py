"""Depth sharding (idm3d.domain) with gloo in fresh processes: the sharded IDMUNet equals the unsharded one.

Each worker builds the default IDMUNet at small width (levels 4, two couplings per level, attention on
the two lowest levels) in fp64, computes the unsharded forward and backward itself, then the sharded
ones on its depth slices, and writes the differences; the test process judges them. It also counts the
collectives by kind in forward and in backward, against the counts stated from the net's structure.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import gloo_group, perturb
from idm3d.domain import COUNTER, check_shard_depth, gather_depth, halo_bytes, scatter_depth, shard, sync_gradients
from idm3d.domain.attention import DomainChannelAttention3d, DomainSpatialAttention3d
from idm3d.domain.comm import CALLS, Domain, local_slices
from idm3d.domain.norm import DomainGroupNorm
from idm3d.nets.idm_unet import IDMUNet

EDGE = 8  # height and width; the shard depth is 8 = 2 ** (levels - 1) as well
# (attention, memory_efficient): each size runs both attentions and both switches, the two sizes every pair
# (measured with all four on both sizes: every figure within 2e-13 of its scale)
CASES = {2: [("channel", False), ("spatial", True)], 4: [("channel", True), ("spatial", False)]}


def _net(attention: str, memory_efficient: bool) -> IDMUNet:
    torch.manual_seed(0)
    net = IDMUNet(channels=4, attention=attention, memory_efficient=memory_efficient).double()
    return perturb(net, 7, 0.05)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a - b).detach().abs().max()) / scale


def _stated_calls(net: IDMUNet, memory_efficient: bool) -> dict[str, dict[str, int]]:
    """The collectives of one forward and one backward by kind, from the sharded net's layers.

    Forward: one "stats" collective per GroupNorm (statistics), channel attention (Gram) and spatial
    attention (gathered map). Backward: one all-reduce of gradient sums per GroupNorm and channel
    attention, and per spatial attention its output gradient's gather (memory-efficient) or the
    all-reduce of the gathered map's gradient (plain autograd). Memory-efficient, the core's node
    replays the statistics its ops and head kept, so the rebuild sends none: only the stem's
    checkpoint recomputation (outside the node) gathers its statistics again.
    """
    def count(module: torch.nn.Module, *classes: type) -> int:
        return sum(isinstance(m, classes) for m in module.modules())

    stat_layers = (DomainGroupNorm, DomainChannelAttention3d, DomainSpatialAttention3d)
    spatial = count(net, DomainSpatialAttention3d)
    reduce = count(net, DomainGroupNorm, DomainChannelAttention3d) + (0 if memory_efficient else spatial)
    backward = {"stats": count(net.stem, *stat_layers) if memory_efficient else 0, "reduce": reduce,
                "gather": spatial if memory_efficient else 0}
    stated = {"forward": {"stats": count(net, *stat_layers)}, "backward": backward}
    if memory_efficient:
        stated["kept"] = {"stats": count(net.core, *stat_layers) + count(net.head, *stat_layers)}
    return stated


def _case(attention: str, memory_efficient: bool, group: dist.ProcessGroup | None) -> dict[str, float]:
    domain = Domain.of(group)
    rank, world = domain.rank, domain.size
    depth = EDGE * world
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 1, depth, EDGE, EDGE, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, 1, depth, EDGE, EDGE, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 700])
    net = _net(attention, memory_efficient)
    ref = copy.deepcopy(net)
    x_ref = x.clone().requires_grad_(True)
    out_ref = ref(x_ref, t)
    (out_ref * weight).sum().backward()

    shard(net, group)
    x_loc = scatter_depth(x, group, multiple=net.size_multiple).requires_grad_(True)
    COUNTER.clear()
    CALLS.clear()
    out = net(x_loc, t)
    calls = {"forward": {k: v for k, v in CALLS.items() if k != "halo"}}
    CALLS.clear()
    (out * scatter_depth(weight, group)).sum().backward()  # the volume's sum: each rank's part of it
    calls["backward"] = {k: v for k, v in CALLS.items() if k != "halo"}
    if memory_efficient:  # what the core's node kept = what its rebuild did not send again
        calls["kept"] = {"stats": calls["forward"]["stats"] - calls["backward"].get("stats", 0)}
    halo = COUNTER["halo"]
    sync_gradients(net, group)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values())
    # relative to the gradient scale: some gradients are zero in exact arithmetic (a bias that a
    # GroupNorm removes) and rounding noise in both nets
    param_err = max(_rel(p.grad, grads[n], scale) for n, p in net.named_parameters())
    with torch.no_grad():
        emb = net.embed(x_loc, t)
        h = net._stem(x_loc)
        z = net.core(h, emb)
        back = net.core.inverse(z, emb)
        z_ref = ref.core(ref._stem(x), ref.embed(x, t))
    expected = halo_bytes(net, tuple(x.shape), world, rank, torch.float64, 2 if memory_efficient else 1)
    return {
        "out": _rel(out.detach(), local_slices(out_ref, domain), float(out_ref.detach().abs().max())),
        "gathered": _rel(gather_depth(out, group), out_ref, float(out_ref.detach().abs().max())),
        "input_grad": _rel(x_loc.grad, local_slices(x_ref.grad, domain), float(x_ref.grad.abs().max())),
        "param_grad": param_err,
        "core": _rel(z, local_slices(z_ref, domain), float(z_ref.abs().max())),
        "round_trip": _rel(back, h, float(h.abs().max())),
        "halo": halo,
        "halo_expected": expected,
        "calls": calls,
        "calls_expected": _stated_calls(net, memory_efficient),
    }


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, world):
        # one start-up for both sizes (it dominates): 4 ranks on the world, then 2 on pair subgroups
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        saved = {}
        for size, group in ((4, None), (2, pairs[rank // 2])):
            results = {f"{a}-{me}": _case(a, me, group) for a, me in CASES[size]}
            net = shard(_net("channel", True), group)
            messages = []
            try:
                net(torch.zeros(1, 1, 4, EDGE, EDGE, dtype=torch.float64), torch.tensor([1]))
            except ValueError as err:
                messages.append(str(err))
            try:
                scatter_depth(torch.zeros(1, 1, 4 * size, EDGE, EDGE), group, multiple=8)
            except ValueError as err:
                messages.append(str(err))
            saved[size] = {"results": results, "messages": messages}
        torch.save(saved, Path(out) / f"rank{rank}.pt")


def test_sharded_idmunet_equals_the_unsharded_one_on_2_and_4_ranks(tmp_path: Path):
    mp.spawn(_worker, args=(4, str(tmp_path / "init"), str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        for size, saved in torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).items():
            assert set(saved["results"]) == {f"{a}-{me}" for a, me in CASES[size]}
            for case, r in saved["results"].items():
                for name in ("out", "gathered", "input_grad", "param_grad", "core", "round_trip"):
                    assert r[name] <= 1e-10, (size, rank, case, name, r[name])
                # the halo bytes sent equal the figure stated from the shapes
                assert r["halo"] == r["halo_expected"] > 0, (size, rank, case, r)
                # the collectives, by kind, equal those stated from the layers: memory-efficient, the
                # rebuild in backward sends no forward statistic (the node replays what it kept)
                expected = {k: {n: c for n, c in v.items() if c} for k, v in r["calls_expected"].items()}
                assert r["calls"] == expected, (size, rank, case, r["calls"], expected)
            thin, scatter = saved["messages"]
            assert thin == (f"depth sharding: shard depth 4 (the volume's depth / {size} ranks) must be a multiple "
                            "of 8 = 2 ** (levels - 1)")
            assert "\n" not in scatter
            assert "multiple of 8" in scatter


def test_shard_depth_check_is_one_line():
    check_shard_depth(16, 2, 8)
    with pytest.raises(ValueError, match=r"^depth sharding: shard depth 12 .* multiple of 8 = 2 \*\* \(levels - 1\)$"):
        check_shard_depth(12, 2, 8)
