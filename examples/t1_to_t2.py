"""T1 -> T2 synthesis from Python through idm3d's public API: train a run, load it back, translate a scan.

    python examples/t1_to_t2.py --out runs/t1t2-example                # the MNI demo templates, ~10 min on 2 cores
    python examples/t1_to_t2.py --data BRATS/ --out runs/t1t2-brats    # a folder of cases with t1 and t2 files
    python examples/t1_to_t2.py --smoke --out runs/t1t2                # a tiny run in seconds (what CI runs)

The recipe is the demo's (``configs/demo.yaml``: x0 prediction, L1 loss, thin axial patches, 10 DDIM
steps); ``--minutes`` sets its training time. What each step calls:

1. ``idm3d.load_config`` + ``idm3d.train``: the same as ``idm3d train --config ... --set ...``;
   the run folder gets the config, checkpoints, metrics (and TensorBoard events when installed).
2. ``idm3d.load_run``: the EMA model, its sampling scheduler and the ready ``DiffusionPipeline``,
   loaded from safetensors (nothing is unpickled).
3. ``idm3d.sample_to_file``: reads the T1 NIfTI, preprocesses it as in training, runs the chain and writes the
   synthetic T2 on the T1's own grid and affine (``idm3d sample --condition``).
4. The same chain by hand, on a tensor: ``run.pipeline.sample(shape, condition, scheduler=run.scheduler())``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import idm3d

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# --smoke: a network and budget small enough for CI; everything else as in the recipe.
SMOKE = [
    "model.kwargs={channels: 8, levels: 2, blocks_per_level: 1, attention_levels: [false, false], attention: none}",
    "data.patch_size=[16,16,16]", "train.max_seconds=null", "train.max_steps=3", "train.checkpoint_every=3",
    "train.log_every=1", "train.log.preview_steps=2", "sample.steps=2",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the run (OUT/run) and the synthetic T2")
    p.add_argument("--data", type=Path, help="a folder of cases with t1 and t2 files (default: the MNI templates)")
    p.add_argument("--t1", type=Path, help="the T1 to translate (default: a held-out case, or the MNI T1)")
    p.add_argument("--minutes", type=float, default=8.0, help="training time (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--smoke", action="store_true", help="a tiny network, 3 steps, 2 sampling steps")
    return p.parse_args(argv)


def held_out_t1(run: idm3d.LoadedRun) -> Path:
    """A T1 the model did not train on: the first test case of the run's split, or the MNI template."""
    root = run.config.data.root
    if root is None:
        from idm3d.data.demo import demo_files

        return demo_files()["t1bet"]  # the demo trains on its lower axial slabs only
    from idm3d.data.cases import find_cases

    split = run.run.read_split()
    cases = {c.case_id: c for c in find_cases(root, ["t1"])}
    return cases[split.test[0] if split is not None and split.test else sorted(cases)[0]].files["t1"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [f"train.device={args.device}", f"train.max_seconds={args.minutes * 60}", "train.max_steps=null"]
    if args.data is not None:
        overrides += [f"data.root={args.data}", "data.test_fraction=0.2"]
    if args.smoke:
        overrides += SMOKE
        torch.set_num_threads(min(2, torch.get_num_threads()))

    # 1. Train (what `idm3d train --config configs/demo.yaml --set ...` does).
    cfg = idm3d.load_config(RECIPE, overrides)
    run_dir = idm3d.train(cfg, args.out / "run")

    # 2. Load it back: EMA weights, the sampling scheduler, the pipeline.
    run = idm3d.load_run(run_dir, device=args.device)
    params = sum(p.numel() for p in run.model.parameters())
    print(f"loaded {run.checkpoint.name}: {type(run.model).__name__} ({params:,} parameters, {run.weights} weights), "
          f"{type(run.scheduler()).__name__} with {run.settings.steps} steps, {run.sources} -> {run.targets}")

    # 3. Translate a NIfTI file; the output lies on the input's grid, with its affine.
    t1 = args.t1 if args.t1 is not None else held_out_t1(run)
    written = idm3d.sample_to_file(run, args.out / "t2_synthetic.nii.gz", {"t1": t1}, progress=not args.smoke)
    print(f"{t1} -> {written[0]} (mid-slices: {written[-1]})")

    # 4. The same chain on a tensor in the model's [-1, 1] range (a training-patch-sized block here).
    grid = tuple(cfg.data.patch_size)
    condition = torch.zeros(1, len(run.sources), *grid)
    volume = run.pipeline.sample((1, len(run.targets), *grid), condition, scheduler=run.scheduler(),
                                 generator=torch.Generator().manual_seed(0), device=run.device)
    print(f"pipeline.sample on a {list(grid)} tensor: output {list(volume.shape)}, "
          f"range [{float(volume.min()):.2f}, {float(volume.max()):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
