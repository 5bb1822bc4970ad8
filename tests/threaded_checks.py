"""Worker for tests/test_threads.py: runs IDMUNet checks the way users run them (2 intra-op threads).

Run as ``python tests/threaded_checks.py CONFIG OUT.json``; the suite itself pins one thread (conftest),
so the thread count must be set in a fresh process. Writes the measured errors as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import torch

# Before any parallel work: the intra-op pool is sized once per process.
torch.set_num_threads(2)

from idm3d import IDMUNet  # noqa: E402

EDGE, BATCH = 16, 2
# The default IDMUNet() layout (4 levels, 32 channels, channel attention at levels 2 and 3) with 2 heads,
# and a spatial-attention net with 2 heads whose 8^3 bottleneck has 256 tokens per parity.
CONFIGS = {
    "default_heads2": {"num_heads": 2},
    # with a per-sample context vector added to the timestep embedding
    "spatial_heads2": {"channels": 8, "levels": 2, "attention": "spatial", "attention_levels": [False, True],
                       "num_heads": 2, "context_dim": 4},
}


def perturbed(kwargs: dict) -> IDMUNet:
    """The net with every weight moved off its initialisation (a zero head would hide the core's gradients)."""
    torch.manual_seed(0)
    net = IDMUNet(**kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def grads(net: IDMUNet, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, memory_efficient: bool, ctx=None):
    """(output, dL/dx, dL/dparams) for L = sum(net(x, t, ctx) * w)."""
    net.memory_efficient = memory_efficient
    net.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = net(x, t, ctx)
    (out * w).sum().backward()
    params = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return out.detach(), x.grad.detach(), params


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(name: str) -> dict:
    net = perturbed(CONFIGS[name])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 1, EDGE, EDGE, EDGE, generator=gen)
    w = torch.randn(BATCH, 1, EDGE, EDGE, EDGE, generator=gen)
    t = torch.tensor([1, 500])
    ctx = None if net.time_embed.context_dim is None else torch.randn(BATCH, net.time_embed.context_dim, generator=gen)
    started = time.perf_counter()
    out, gx, gp = grads(net, x, t, w, True, ctx)
    report: dict = {"threads": torch.get_num_threads(), "step_s": time.perf_counter() - started}
    plain_out, plain_gx, plain_gp = grads(net, x, t, w, False, ctx)
    report["grad_vs_plain"] = {"output": rel(out, plain_out), "input": rel(gx, plain_gx), "params": rel(gp, plain_gp)}
    with torch.no_grad():
        report["round_trip"] = max(net.reconstruction_error(x, t, ctx).values())
    # Per-sample independence: sample i alone gets the output and input gradient it gets in the batch, and
    # the batch's parameter gradient is the sum of the samples' ones.
    alone = [grads(net, x[i : i + 1], t[i : i + 1], w[i : i + 1], True, None if ctx is None else ctx[i : i + 1])
             for i in range(BATCH)]
    report["per_sample"] = {
        "output": max(rel(out[i : i + 1], a[0]) for i, a in enumerate(alone)),
        "input": max(rel(gx[i : i + 1], a[1]) for i, a in enumerate(alone)),
        "params": rel(gp, alone[0][2] + alone[1][2]),
    }
    # One thread (what the rest of the suite runs) against two, in this process.
    torch.set_num_threads(1)
    one = grads(net, x, t, w, True, ctx)
    torch.set_num_threads(2)
    report["one_vs_two_threads"] = {"output": rel(one[0], out), "input": rel(one[1], gx), "params": rel(one[2], gp)}
    return report


def attention() -> dict:
    """Batched inverses and log-determinants above the size where CPU batched LU fails (pytorch#142815)."""
    from idm3d.invertible import InvertibleSequence, gradient_check, invertible_attention

    report = {}
    for name, kwargs, edge in (("channel256", {"channels": 256, "variant": "channel"}, 4),
                               ("spatial256_heads2", {"channels": 4, "variant": "spatial", "heads": 2}, 8)):
        torch.manual_seed(0)
        layers = [invertible_attention(**kwargs, cond_dim=8, channel_alternating=alt) for alt in (False, True)]
        with torch.no_grad():
            for m in layers:
                m.to_q.weight.mul_(8.0)
                m.to_k.weight.mul_(8.0)
        x = torch.randn(BATCH, kwargs["channels"], edge, edge, edge)
        emb = torch.randn(BATCH, 8)
        with torch.no_grad():
            y = layers[0](x, emb)
            back = layers[0].inverse(y, emb)
            batched = layers[0].log_det(x, emb)
            alone = torch.cat([layers[0].log_det(x[i : i + 1], emb[i : i + 1]) for i in range(BATCH)])
        segment = InvertibleSequence(layers, memory_efficient=True)
        report[name] = {"round_trip": float((back - x).abs().max() / x.abs().max()),
                        "log_det_vs_alone": float((batched - alone).abs().max() / alone.abs().max()),
                        "gradient_check": max(gradient_check(segment, x, emb).values())}
    return report


def sampler() -> dict:
    """The patch batch of a step does not depend on the thread count (one CPU generator per step)."""
    from idm3d.data.patches import PatchSampler

    gen = torch.Generator().manual_seed(3)
    volumes = [torch.rand(2, 24, 20, 16, generator=gen) for _ in range(3)]
    masks = [v[:1] > 0.3 for v in volumes]
    batches = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        s = PatchSampler(volumes, masks, (8, 8, 8), batch_size=BATCH, seed=4, foreground_prob=0.7,
                         target_channels=[0])
        batches[threads] = [s.batch(step) for step in range(3)]
    torch.set_num_threads(2)
    same = all(torch.equal(a[k], b[k]) for a, b in zip(batches[1], batches[2]) for k in ("source", "target"))
    return {"same_batches": same}


def _ddp_rank(rank: int, world: int, init_file: str, out: str) -> None:
    from helpers import gloo_group

    with gloo_group(init_file, rank, world, threads=2):
        net = perturbed(DDP_CONFIG)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        x, w, t = ddp_batch()
        shard = slice(BATCH * rank, BATCH * rank + BATCH)  # as DistContext.shard cuts the global batch
        (ddp(x[shard], t[shard]) * w[shard]).sum().backward()  # DDP averages: the gradient of the sum / world
        torch.save(torch.cat([p.grad.flatten() for p in net.parameters()]), f"{out}/rank{rank}.pt")


DDP_CONFIG = {k: v for k, v in CONFIGS["spatial_heads2"].items() if k != "context_dim"}


def ddp_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of the DDP check: 2 ranks x batch 2 at 8^3."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2 * BATCH, 1, 8, 8, 8, generator=g), torch.randn(2 * BATCH, 1, 8, 8, 8, generator=g)
    return x, w, torch.tensor([1, 500, 20, 999])


def ddp(folder: str) -> None:
    """Two gloo ranks with 2 threads each write their gradients to ``folder``."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, f"{folder}/init", folder), nprocs=2, join=True)


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "ddp":
        ddp(path)
    else:
        # "nets": every net config, the attention and the sampler checks in one process (one start-up)
        report = {"attention": attention(), "sampler": sampler(), **{name: run(name) for name in CONFIGS}}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
