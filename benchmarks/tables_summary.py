"""README's summary table: the headline figures, each linked to its page under docs/bench/."""

from __future__ import annotations

from typing import Any

from benchmarks.tables_common import fmt, load, table

__all__ = ["summary"]


def _probe(row: dict[str, Any], size: int) -> dict[str, Any]:
    return next((p for p in row.get("probes", []) if p.get("size") == size), {})


def summary() -> str:
    """README's one table: the headline figures, each linked to its page under docs/bench/."""
    mem64 = {r["net"]: r for r in load("memory-64.jsonl")}
    sizes = {r["net"]: r for r in load("max-size.jsonl")}
    big_train = {r["net"]: r for r in load("idm-256.jsonl")}
    infer = {r["net"]: r for r in load("inference-256.jsonl")}
    if not (mem64 and sizes and big_train and infer):
        return ""
    gib = 1024.0

    def mib(row: dict[str, Any] | None, key: str = "peak_growth_mib") -> float | None:
        return None if not row or row.get(key) is None else float(row[key])

    def ratio(a: float | None, b: float | None) -> str:
        return fmt(a / b if a is not None and b else None, ".2f") + "x"

    i64, m64 = mib(mem64.get("idm")), mib(mem64.get("monai-ckpt"))
    i128 = _probe(sizes.get("idm", {}), 128).get("peak_growth_mib")
    m128 = _probe(sizes.get("monai-ckpt", {}), 128).get("peak_growth_mib")
    # ">=": the largest size probed fitted, so the true limit lies above it
    cubes = {net: ("≥ " if sizes[net].get("hit_max") else "") + f"{sizes[net].get('max_size')}³"
             for net in ("idm", "monai-ckpt", "patchddm-ckpt") if net in sizes}
    train = big_train.get("idm", {})
    # the in-place no-grad call (issue 29) where measured; PatchDDM-3D's from the same command's table
    after = {r["net"]: r for r in load("sampling-256.jsonl")}
    i256, p256 = mib(after.get("idm") or infer.get("idm")), mib(infer.get("patchddm"))
    step512 = next(iter(load("sampling-512-step.jsonl")), {})
    rows = [
        ["training step, 64³: peak memory vs MONAI `DiffusionModelUNet` checkpointed",
         f"{fmt(i64, ',.0f')} vs {fmt(m64, ',.0f')} MiB", ratio(i64, m64), "[memory-64](docs/bench/memory-64.md)"],
        ["training step, 128³: peak memory vs MONAI checkpointed",
         f"{fmt(i128, ',.0f')} vs {fmt(m128, ',.0f')} MiB", ratio(i128, m128), "[max-size](docs/bench/max-size.md)"],
        ["largest trainable cube within 21 GiB: IDMUNet / MONAI ckpt / PatchDDM-3D ckpt",
         " / ".join(cubes.values()), "", "[max-size](docs/bench/max-size.md)"],
        ["one 256³ training step on 2 CPU cores",
         f"{fmt(train.get('first_step_s'), '.0f')} s, {fmt(mib(train) and mib(train) / gib, '.1f')} GiB", "",
         "[idm-256](docs/bench/idm-256.md)"],
        ["one 256³ denoiser call (sampling) vs PatchDDM-3D",
         f"{fmt(i256, ',.0f')} vs {fmt(p256, ',.0f')} MiB", ratio(i256, p256),
         "[inference-256](docs/bench/inference-256.md), [sampling-256](docs/bench/sampling-256.md)"],
    ]
    inference_cubes = load("max-size-inference.jsonl")
    if inference_cubes:
        found = {r["net"]: r for r in inference_cubes}
        cubes = [("≥ " if found[n].get("hit_max") else "") + (f"{found[n]['max_size']}³" if found[n].get("max_size")
                 else "none") for n in ("idm", "monai", "patchddm") if n in found]
        at = _probe(found.get("idm", {}), found.get("idm", {}).get("max_size"))
        if cubes and at.get("peak_growth_mib") is not None:
            cubes[0] += f" ({at['peak_growth_mib'] / gib:.1f} GiB, {fmt(at.get('first_step_s'), '.0f')} s)"
        rows.append(["largest cube one no-grad call fits within 21 GiB: IDMUNet / MONAI / PatchDDM-3D",
                     " / ".join(cubes), "", "[max-size-inference](docs/bench/max-size-inference.md)"])
    if step512:
        measured = f"{step512['size']}³: {step512.get('status')}"
        if step512.get("status") == "ok":
            measured = (f"{step512['size']}³, {fmt(mib(step512) and mib(step512) / gib, '.1f')} GiB, "
                        f"{fmt(step512.get('first_step_s'), '.0f')} s")
        label = "largest sampled cube (largest measured): one whole-volume DDIM step of IDMUNet within 21 GiB"
        rows.append([label, measured, "", "[sampling-512-step](docs/bench/sampling-512-step.md)"])
    machine = next(iter(mem64.values())).get("machine", {})
    head = (f"CPU only so far ({machine.get('cpu_cores', '?')} cores, torch {machine.get('torch', '?')}, fp32, "
            "batch 1, one fresh process per configuration); no GPU figure exists yet.")
    return head + "\n\n" + table(["figure", "measured", "ratio", "data and command"], rows)
