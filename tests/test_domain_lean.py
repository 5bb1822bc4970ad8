"""The lean no-grad forward on depth shards (idm3d.domain.lean): each rank's slices of one process's call."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from helpers import gloo_group, perturb, torch_threads
from idm3d.domain.comm import Domain, gather_depth, local_slices
from idm3d.domain.lean import LeanShardedNet
from idm3d.invertible.inplace import inference_budget
from idm3d.invertible.mode import hooked
from idm3d.nets.idm_unet import IDMUNet

SHAPE = (2, 1, 16, 8, 8)  # the default net's levels need a shard depth of 8: 16 over 2 ranks
# (slab_bytes, work_bytes): one plane per slab with every hidden plane recomputed; an odd number of
# planes per slab with part of the hidden maps kept, and the small low-level sub-networks run whole
# (through their sharded modules)
BUDGETS = [(3000, 0), (3 * 2 * 8 * 64 * 4 + 5, 30000)]
# float32 within its rounding (the channel attention's Gram, summed in another order, moves its solve
# by up to ~5e-6 of the output at this size: test_domain_sampling's tolerance); float64 to 1e-10: exact
CASES = [("spatial", torch.float32, 1e-6), ("channel", torch.float64, 1e-10)]


def _net(attention: str, dtype: torch.dtype) -> IDMUNet:
    torch.manual_seed(0)
    return perturb(IDMUNet(attention=attention), seed=3).to(dtype).eval()


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype), torch.tensor([10, 700])


def _calls(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for slab, work in BUDGETS:
        with torch.no_grad(), inference_budget(slab_bytes=slab, work_bytes=work):
            out.append(net(x, t))
    return out


def _worker(rank: int, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, 2):
        results: dict[str, torch.Tensor] = {}
        for attention, dtype, _ in CASES:
            x, t = _inputs(dtype)
            lean = LeanShardedNet(_net(attention, dtype))
            assert not hooked(lean.net)  # IDMUNet takes its in-place path only when nothing hooks it
            for i, y in enumerate(_calls(lean, local_slices(x, Domain.of(None)).contiguous(), t)):
                results[f"{attention}{dtype}{i}"] = gather_depth(y)
        try:
            lean(x[:, :, :8], t)  # gradients on
        except RuntimeError as err:
            results["grad"] = torch.tensor(list(str(err).encode()))
        torch.save(results, Path(out) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process_lean_call(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    with torch_threads(1):
        for attention, dtype, tol in CASES:
            x, t = _inputs(dtype)
            for i, want in enumerate(_calls(_net(attention, dtype), x, t)):
                for r in ranks:  # the whole volume on every rank
                    err = float((r[f"{attention}{dtype}{i}"] - want).abs().max() / want.abs().max())
                    assert err < tol, (attention, dtype, BUDGETS[i], err)
    message = bytes(ranks[0]["grad"].tolist()).decode()
    assert message.startswith("LeanShardedNet: no-grad calls only")
    assert "\n" not in message

