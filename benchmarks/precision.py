"""``python -m benchmarks.precision``: how far inputs rebuilt through inverses drift in bf16/fp16.

For one IDMUNet (weights perturbed away from their identity start, as after training), every core
op's input is rebuilt the way the memory-efficient backward rebuilds it (inverting from the core
output down) and compared with the input a plain forward produced, under several precision
policies:

- ``fp32``: everything in float32 (the reference);
- ``autocast-bf16`` / ``autocast-fp16``: sub-networks under autocast, the core state (coupling
  additions, orthogonal resampling, attention application) in float32 - what idm3d runs;
- ``state-bf16``: the whole model cast to bfloat16, state included (what idm3d avoids).

Errors are relative to the RMS of the true input of each op.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import torch

from idm3d.bench.report import (
    Column,
    add_common_arguments,
    emit,
    machine_info,
    machine_markdown,
    markdown_table,
    progress,
)
from idm3d.errors import ConfigError

__all__ = ["POLICIES", "add_arguments", "measure", "run"]

POLICIES = ("fp32", "autocast-bf16", "autocast-fp16", "state-bf16")


def _policy(name: str, device: str) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    if name == "fp32":
        return torch.float32, contextlib.nullcontext()
    if name.startswith("autocast-"):
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float16
        return torch.float32, torch.autocast(device, dtype=dtype)
    if name == "state-bf16":
        return torch.bfloat16, contextlib.nullcontext()
    raise ConfigError(f"--policies: unknown policy {name!r}; choose from {', '.join(POLICIES)}")


@torch.no_grad()
def measure(
    policy: str, size: int, channels: int, levels: int, perturb: float, seed: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Per-op relative reconstruction error of an IDMUNet core under ``policy``."""
    from idm3d.nets.idm_unet import IDMUNet

    torch.manual_seed(seed)
    attention_levels = tuple(level >= levels - 2 for level in range(levels))
    net = IDMUNet(channels=channels, levels=levels, attention_levels=attention_levels).to(device)
    for p in net.parameters():
        p.add_(perturb * torch.randn_like(p))
    dtype, context = _policy(policy, device)
    net = net.to(dtype)
    x = torch.randn(1, 1, size, size, size, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    with context:
        emb = net.embed(x, t)
        state = (net._stem(x),)
        inputs = []
        for op in net.core.ops:
            inputs.append(state)
            state = op(state, (emb,))
        rows = []
        for i in reversed(range(len(net.core.ops))):
            state = net.core.ops[i].inverse(state, (emb,))
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(state, inputs[i]))
            rms = max(float(b.float().square().mean().sqrt()) for b in inputs[i])
            rows.append({"op": net.op_names[i], "policy": policy, "max_abs_error": err, "relative_error": err / rms})
    return rows[::-1]


def gradient_errors(
    policy: str, size: int, channels: int, levels: int, perturb: float, seed: int, device: str = "cpu"
) -> dict[str, float]:
    """Parameter-gradient error against fp32 plain autograd, plain vs memory-efficient, under ``policy``.

    The drift above only matters through the gradients: if the memory-efficient gradients under a
    policy are as close to the fp32 reference as plain autograd's under the same policy are, the
    rebuilt inputs add nothing to the error low precision already makes.
    """
    from idm3d.nets.idm_unet import IDMUNet

    torch.manual_seed(seed)
    attention_levels = tuple(level >= levels - 2 for level in range(levels))
    net = IDMUNet(channels=channels, levels=levels, attention_levels=attention_levels).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(perturb * torch.randn_like(p))
    x = torch.randn(1, 1, size, size, size, device=device)
    target = torch.randn_like(x)
    t = torch.tensor([500], device=device)

    def grads(memory_efficient: bool, context: contextlib.AbstractContextManager) -> torch.Tensor:
        net.memory_efficient = memory_efficient
        net.zero_grad()
        with context:
            loss = torch.nn.functional.mse_loss(net(x, t).float(), target)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    reference = grads(False, contextlib.nullcontext())
    _, context = _policy(policy, device)
    out = {}
    for mode, flag in (("plain", False), ("memory_efficient", True)):
        _, context = _policy(policy, device)
        out[mode] = float((grads(flag, context) - reference).norm() / reference.norm())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=32, help="cube edge (default 32)")
    parser.add_argument("--channels", type=int, default=16, help="core width (default 16)")
    parser.add_argument("--levels", type=int, default=3, help="U-Net levels (default 3)")
    parser.add_argument("--perturb", type=float, default=0.05, help="weight perturbation scale (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {', '.join(POLICIES)}")


def run(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        _policy(p, "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for policy in policies:
        progress(f"precision: {policy}")
        try:
            by_policy[policy] = measure(
                policy, args.size, args.channels, args.levels, args.perturb, args.seed, args.device
            )
        except RuntimeError as err:  # e.g. an op without a kernel for this dtype on this device
            progress(f"precision: {policy} unsupported here: {str(err).splitlines()[0]}")
    rows = [r for rs in by_policy.values() for r in rs]
    ops = [r["op"] for r in next(iter(by_policy.values()), [])]
    table = [{"op": op, **{p: by_policy[p][i]["relative_error"] for p in by_policy}} for i, op in enumerate(ops)]
    table.append({"op": "**max**", **{p: max(r["relative_error"] for r in by_policy[p]) for p in by_policy}})
    info = machine_info(args.device)
    header = (
        f"## Rebuilt-input drift per core op (relative to the op input's RMS)\n\n"
        f"IDMUNet channels={args.channels} levels={args.levels}, {args.size}^3, weights perturbed by "
        f"{args.perturb}, seed {args.seed}. {machine_markdown(info)}\n\n"
    )
    grad_rows = []
    for policy in by_policy:
        if policy.startswith("state-"):
            continue
        errors = gradient_errors(policy, args.size, args.channels, args.levels, args.perturb, args.seed, args.device)
        grad_rows.append({"policy": policy, **{f"grad_error_{k}": v for k, v in errors.items()}})
    rows += grad_rows
    columns = [Column("op", "op")] + [Column(p, p, ".1e") for p in by_policy]
    grad_table = markdown_table(
        grad_rows,
        [
            Column("policy", "policy"),
            Column("grad_error_plain", "plain autograd", ".1e"),
            Column("grad_error_memory_efficient", "memory-efficient", ".1e"),
        ],
    )
    emit(
        [{**r, "machine": info} for r in rows],
        header
        + markdown_table(table, columns)
        + "\n\n## Parameter-gradient error vs fp32 plain autograd (relative L2)\n\n"
        + grad_table,
        args,
    )
    return 0


if __name__ == "__main__":
    from benchmarks import main

    sys.exit(main(sys.modules[__name__]))
