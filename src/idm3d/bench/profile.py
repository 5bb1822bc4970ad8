"""``idm3d bench profile``: which modules of one training step hold memory, and how much.

One training step of ``IDMUNet()`` (or any ``--nets`` network), each configuration in a fresh
process, with three instruments:

- bytes saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd
  keeps; each is charged (once per storage, parameters excluded) to the innermost module running
  when it was saved, separately for the forward pass and for the backward pass (where the
  memory-efficient core rebuilds its activations and saves them for one block at a time);
- peak memory inside each module's forward and backward: after every aten op (a dispatch mode) the
  RSS high-water mark since the previous op (CPU; ``max_memory_allocated`` on CUDA) is charged, as
  growth over the step's starting memory, to the module running it and to all its parents;
- in backward, the running module is the one whose forward created the autograd node being executed
  (node pre-hooks), or, inside a rebuilt forward, the module on the call stack.

The table lists modules down to ``--depth`` levels (deeper modules fold into their parents) and
a PNG shows the saved bytes per module for ``memory_efficient`` True and False.
"""

from __future__ import annotations

import argparse
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from idm3d.bench.harness import (
    MIB,
    Column,
    add_common_arguments,
    emit,
    machine_info,
    machine_markdown,
    markdown_table,
    parse_sizes,
    progress,
    reset_peak_rss,
    resolve_device,
    run_config,
)
from idm3d.children import status_kib

__all__ = ["StepProfiler", "add_arguments", "child", "run"]

ROOT = "(step)"  # work outside every module: the loss, the optimiser's zero_grad


def _hwm_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return (status_kib("VmHWM") or 0) * 1024


def _reset_hwm(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


class _OpPeaks(TorchDispatchMode):
    def __init__(self, profiler: StepProfiler) -> None:
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.profiler._charge_peak()
        return out


class StepProfiler:
    """Per-module saved-for-backward bytes and peak memory growth over one step.

    Use as a context manager around forward and backward of ``model``; read :attr:`records`:
    ``{module name: {"saved_forward", "saved_backward", "peak_forward", "peak_backward"}}`` in bytes
    (peaks as growth over the memory at entry, including children; saved bytes excluding them).
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.model, self.device = model, torch.device(device)
        self.names = {m: (n or type(model).__name__) for n, m in model.named_modules()}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.records: dict[str, dict[str, int]] = {}
        self.saved_total = 0  # every counted byte, however attributed (a check of the attribution)
        self._stack: list[str] = []
        self._bw_module = ROOT
        self._alive: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self._handles: list[Any] = []
        self._base = 0

    # -- which module runs now
    def _in_backward(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def _current(self) -> tuple[str, str]:
        backward = self._in_backward()
        name = self._stack[-1] if self._stack else (self._bw_module if backward else ROOT)
        return name, "backward" if backward else "forward"

    def _record(self, name: str) -> dict[str, int]:
        return self.records.setdefault(
            name, {"saved_forward": 0, "saved_backward": 0, "peak_forward": 0, "peak_backward": 0}
        )

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._stack.append(self.names[module])

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._stack.pop()
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for out in outputs:
            node = out.grad_fn if isinstance(out, Tensor) else None
            # The innermost module that returned this node owns it (children finish first).
            if node is not None and "idm3d_module" not in node.metadata:
                node.metadata["idm3d_module"] = name
                node.register_prehook(self._node_hook(name))

    def _node_hook(self, name: str) -> Any:
        def hook(grad_outputs: Any) -> None:
            self._bw_module = name

        return hook

    # -- instruments
    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self._alive:
            self._alive[ptr] = tensor
            name, phase = self._current()
            self._record(name)[f"saved_{phase}"] += storage.nbytes()
            self.saved_total += storage.nbytes()
        return tensor

    def _charge_peak(self) -> None:
        growth = max(_hwm_bytes(self.device) - self._base, 0)
        _reset_hwm(self.device)
        name, phase = self._current()
        key = f"peak_{phase}"
        # A module's peak covers its children: charge the op's peak to every enclosing module.
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            record = self._record(".".join(parts[:i]))
            record[key] = max(record[key], growth)
        if name != ROOT:
            root = self._record(self.names[self.model])
            root[key] = max(root[key], growth)

    def __enter__(self) -> StepProfiler:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from idm3d.bench.harness import current_rss_bytes

            self._base = current_rss_bytes() or 0
        _reset_hwm(self.device)
        self._mode = _OpPeaks(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self._saved.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def fold(records: dict[str, dict[str, int]], depth: int) -> dict[str, dict[str, int]]:
    """Merge modules deeper than ``depth`` dots into their ancestor: saved bytes add, peaks max."""
    out: dict[str, dict[str, int]] = {}
    for name, rec in records.items():
        key = ".".join(name.split(".")[: depth + 1])
        merged = out.setdefault(key, dict.fromkeys(rec, 0))
        for field, value in rec.items():
            merged[field] = merged[field] + value if field.startswith("saved") else max(merged[field], value)
    return out


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Profile one training step of one network (runs in a fresh process)."""
    from idm3d.bench.nets import build_net, in_channels

    device = torch.device(config["device"])
    torch.manual_seed(0)
    net = build_net(config["net"], config.get("monai_channels"))
    if hasattr(net, "memory_efficient") and config.get("memory_efficient") is not None:
        net.memory_efficient = bool(config["memory_efficient"])
    net = net.to(device)
    size = config["size"]
    x = torch.randn(1, in_channels(config["net"]), size, size, size, device=device)
    noise = torch.randn(1, getattr(net, "out_channels", 1), size, size, size, device=device)
    timesteps = torch.randint(0, 1000, (1,), device=device)
    # One step first, unprofiled: one-off start-up allocations (thread pools, kernel caches) are
    # not what a module needs.
    F.mse_loss(net(x, timesteps), noise).backward()
    net.zero_grad(set_to_none=True)
    with StepProfiler(net, device) as prof:
        F.mse_loss(net(x, timesteps), noise).backward()
    labels = {f"core.ops.{i}": op for i, op in enumerate(getattr(net, "op_names", []))}
    return {"records": prof.records, "saved_total": prof.saved_total, "labels": labels}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``idm3d bench profile``."""
    parser.add_argument("--size", type=int, default=64, help="cube edge length (default 64)")
    parser.add_argument("--net", default="idm", help="network name as in bench memory (default idm)")
    parser.add_argument("--depth", type=int, default=2, help="module depth of the table (default 2)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of saved bytes per module")
    add_common_arguments(parser)


COLUMNS = (
    Column("module", "module"),
    Column("saved_forward_mib", "saved in forward (MiB)", ".1f"),
    Column("saved_backward_mib", "saved in backward (MiB)", ".1f"),
    Column("peak_forward_mib", "peak in forward (MiB)", ".1f"),
    Column("peak_backward_mib", "peak in backward (MiB)", ".1f"),
)


def run(args: argparse.Namespace) -> int:
    """Run ``idm3d bench profile`` for memory_efficient True and False."""
    from idm3d.bench.nets import NET_LABELS, parse_nets, size_parameters

    (net,) = parse_nets(args.net)
    size = parse_sizes(str(args.size), "--size")[0]
    device = resolve_device(args.device)
    info = machine_info(device)
    sizing, _ = size_parameters()
    modes = (True, False) if net.startswith("idm") else (None,)
    rows = []
    for efficient in modes:
        config = {
            "bench": "profile",
            "net": net,
            "label": NET_LABELS[net],
            "size": size,
            "device": device,
            "threads": args.threads,
            "memory_efficient": efficient,
            "monai_channels": sizing["monai_channels"] if net.startswith("monai") else None,
        }
        progress(f"bench profile: {NET_LABELS[net]}, memory_efficient={efficient}, {size}^3 ...")
        rows.append(run_config("idm3d.bench.profile:child", config, timeout_s=args.timeout))
    emit(rows, _markdown(rows, args, info), args)
    if args.plot is not None:
        _plot(rows, args)
        progress(f"bench profile: wrote {args.plot}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def _table_rows(row: dict[str, Any], depth: int) -> list[dict[str, Any]]:
    folded = fold(row.get("records") or {}, depth)
    labels = row.get("labels") or {}
    out = []
    for name, rec in folded.items():
        label = f"{name} ({labels[name]})" if name in labels else name
        out.append({"module": label, **{f"{k}_mib": v / MIB for k, v in rec.items()}})
    return sorted(out, key=lambda r: -(r["saved_forward_mib"] + r["saved_backward_mib"] + r["peak_backward_mib"]))


def _title(row: dict[str, Any]) -> str:
    efficient = row.get("memory_efficient")
    return row["label"] if efficient is None else f"{row['net']} with memory_efficient={efficient}"


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    out = [f"## idm3d bench profile: one training step at {args.size}^3, batch 1, fp32", "", machine_markdown(info)]
    for r in rows:
        out += ["", f"### {_title(r)}", ""]
        if r.get("status") != "ok":
            out.append(f"- {r.get('status')}: {r.get('error')}")
            continue
        out.append(
            f"Saved for backward in all: {r['saved_total'] / MIB:.1f} MiB. Regions under "
            "`torch.utils.checkpoint` save through checkpoint's own hooks, invisible here: their cost "
            "shows in the peak columns. Peaks are growth over the memory at the start of the step "
            "(after one unprofiled warm-up step) and include the module's children."
        )
        out += ["", markdown_table(_table_rows(r, args.depth), COLUMNS)]
    return "\n".join(out)


def _plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, max(len(ok), 1), figsize=(7 * max(len(ok), 1), 6), squeeze=False)
    for ax, r in zip(axes[0], ok):
        saved = sorted(_table_rows(r, args.depth), key=lambda t: t["saved_forward_mib"] + t["saved_backward_mib"])
        table = [t for t in saved if t["saved_forward_mib"] + t["saved_backward_mib"] > 0][-20:]
        names = [t["module"] for t in table]
        fwd = [t["saved_forward_mib"] for t in table]
        bwd = [t["saved_backward_mib"] for t in table]
        ax.barh(names, fwd, label="saved in forward")
        ax.barh(names, bwd, left=fwd, label="saved in backward (rebuilt)")
        ax.set_xlim(0, 1.05 * max((f + b for f, b in zip(fwd, bwd)), default=1.0))
        ax.set_xlabel("MiB saved for backward")
        ax.set_title(_title(r), fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"idm3d bench profile: one training step at {args.size}^3")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)
