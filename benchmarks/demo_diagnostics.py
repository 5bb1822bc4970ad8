"""Where a demo run's held-out error lies, and what a pointwise intensity map could reach at best.

    python benchmarks/demo_diagnostics.py RUN        # e.g. runs/demo/t1_to_t2/idm

Samples the held-out band with the run's settings (as ``idm3d evaluate`` does) and prints: its scores;
the scores of an *oracle* pointwise map fitted on the held-out band itself (the mean true target per
source-intensity bin inside the brain: no method can use it, it bounds what intensity mapping alone
gives); the mean error (bias) and MAE in the darkest, middle and brightest third of the true target; and
the MAE per axial slice. Used for the analysis in docs/demo.md.
"""

from __future__ import annotations

import sys

import torch

from idm3d.metrics import evaluate_pair
from idm3d.runs.data_source import data_source
from idm3d.runs.load import load_run


def main(run_dir: str) -> None:
    torch.set_num_threads(1)
    run = load_run(run_dir, device="cpu")
    case = next(iter(data_source(run.config).heldout(run.run.read_split(), "test")))
    source, truth = case.channels(run.sources)[0], case.channels(run.targets)[0]
    mask = case.mask[0].bool()
    pred = run.masked(run.infer(condition=case.channels(run.sources)[None])[0], case.mask)[0]
    print("run", {k: round(v, 4) for k, v in evaluate_pair(pred, truth, mask=mask).items()})
    bins = torch.bucketize(source[mask], torch.linspace(-1, 1, 101))
    table = torch.zeros(102)
    for b in bins.unique():
        table[b] = truth[mask][bins == b].mean()
    oracle = torch.full_like(truth, -1.0)
    oracle[mask] = table[bins]
    print("oracle pointwise map fitted on the band", {k: round(v, 4) for k, v in
                                                      evaluate_pair(oracle, truth, mask=mask).items()})
    err, t = (pred - truth)[mask], truth[mask]
    lo, hi = torch.quantile(t, torch.tensor([1 / 3, 2 / 3]))
    for name, sel in (("darkest third", t < lo), ("middle third", (t >= lo) & (t < hi)), ("brightest third", t >= hi)):
        print(f"{name}: mean error {err[sel].mean():+.4f}, MAE {err[sel].abs().mean():.4f}")
    per_z = [round(float((pred - truth)[..., z][mask[..., z]].abs().mean()), 3) for z in range(truth.shape[-1])]
    print("MAE per axial slice (inferior to superior)", per_z)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
