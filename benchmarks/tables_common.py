"""What every table of docs/measurements.md and README's summary shares: the JSON rows of docs/bench/, the
command that wrote each file (``COMMANDS``), the nets' short names, and the markdown table format.

Every table names the command that wrote its JSON; nothing here is typed in by hand except those command
lines (issue 17).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idm3d.bench.compare import add_ratios

__all__ = ["BENCH", "COMMANDS", "ROOT", "SHORT", "fmt", "load", "table"]

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"
NETS = "idm,idm-plain,monai,monai-ckpt,patchddm,patchddm-ckpt,conv-stack"
COMMANDS = {
    "memory-64.jsonl": f"idm3d bench memory --sizes 64 --nets {NETS} --threads 2 --warmup 1 --repeats 2 "
    "--max-growth-gib 14 --json-out docs/bench/memory-64.jsonl --plot docs/bench/memory-64.png",
    "memory-128.jsonl": "OMP_NUM_THREADS=1 idm3d bench memory --sizes 128 --nets idm,patchddm-ckpt,conv-stack "
    "--threads 1 --repeats 1 --max-growth-gib 14 --timeout 2400 --json-out docs/bench/memory-128.jsonl",
    "malloc-64.jsonl": "idm3d bench memory --sizes 64 --nets idm --malloc tuned,system --threads 2 "
    "--warmup 4 --repeats 1 --no-flops --json-out docs/bench/malloc-64.jsonl",
    "inference-128.jsonl": "idm3d bench memory --inference --sizes 128 --nets idm,monai,patchddm,conv-stack "
    "--threads 1 --warmup 1 --repeats 1 --max-growth-gib 12 --json-out docs/bench/inference-128.jsonl",
    "flops-128.jsonl": "idm3d bench memory --flops-only --sizes 128 --nets monai,monai-ckpt,patchddm,patchddm-ckpt "
    "--json-out docs/bench/flops-128.jsonl",
    "idm-256.jsonl": "idm3d bench memory --sizes 256 --nets idm --threads 2 --warmup 0 --repeats 0 --no-flops "
    "--max-growth-gib 16 --timeout 3000 --json-out docs/bench/idm-256.jsonl",
    "idm-256-4k.jsonl": "THP_MEM_ALLOC_ENABLE=0 idm3d bench memory --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 16 --timeout 3000 --json-out docs/bench/idm-256-4k.jsonl",
    "inference-256.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm,monai,patchddm,conv-stack "
    "--threads 2 --warmup 0 --repeats 0 --max-growth-gib 20 --json-out docs/bench/inference-256.jsonl",
    # issue 29: the in-place no-grad path; "-before" ran the same command at 35084c6 (before it)
    "sampling-256-before.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 12 --json-out docs/bench/sampling-256-before.jsonl",
    "sampling-256.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 12 --json-out docs/bench/sampling-256.jsonl",
    "sampling-256-bf16.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 12 --precision bf16 --json-out docs/bench/sampling-256-bf16.jsonl",
    "sampling-512-step.jsonl": "idm3d bench memory --inference --sampling-step --sizes 512 --nets idm --threads 2 "
    "--warmup 0 --repeats 0 --no-flops --max-growth-gib 21 --timeout 5400 "
    "--json-out docs/bench/sampling-512-step.jsonl",
    "max-size.jsonl": "idm3d bench max-size --budget-gib 21 --nets idm,idm-plain,monai,monai-ckpt,patchddm,"
    "patchddm-ckpt --sizes 64,128,192,256,320 --warmup 0 --threads 2 --timeout 3000 "
    "--json-out docs/bench/max-size.jsonl",
    # issue 29: the same bisection without a graph (one denoiser call)
    "max-size-inference.jsonl": "idm3d bench max-size --inference --budget-gib 21 --nets idm,monai,patchddm "
    "--sizes 128,256,512 --warmup 0 --threads 2 --timeout 3000 --json-out docs/bench/max-size-inference.jsonl",
}
# max-size files -> what one probe runs
MAX_SIZE = {
    "max-size.jsonl": "one training step each",
    "max-size-inference.jsonl": "one no-grad denoiser call each",
}
SHORT = {
    "idm": "IDMUNet (memory-efficient)",
    "idm-plain": "IDMUNet (plain autograd)",
    "monai": "MONAI",
    "monai-ckpt": "MONAI, checkpointed",
    "patchddm": "PatchDDM-3D",
    "patchddm-ckpt": "PatchDDM-3D, checkpointed",
    "conv-stack": "8 x Conv3d(32,32,3)+SiLU",
}



def load(name: str) -> list[dict[str, Any]]:
    """The rows of one JSON-lines file, ratios recomputed by the bench's own definition."""
    path = BENCH / name
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and rows[0].get("bench") == "memory":
        add_ratios(rows)
    return rows


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``; ``n/a`` for a missing one."""
    if value is None:
        return "n/a"
    return format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the figures right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
