"""Cross-generator transfer of the supervised detectors: distance features (idm3d's) against signed ones.

Reads a ``features.csv`` written by ``idm3d detect`` or the detect study (two or more generators) and
prints, for every ordered pair of generators A -> B, the AUROC of a detector fitted on the reals and A's
fakes of the training folds, scored on the reals and B's fakes of the held-out folds (the same
``out_of_fold`` folds as the report), for logistic regression and gradient boosting, each on the signed
standardised features (what ``idm3d detect`` fitted before) and on how far each volume lies from the reals
(``RealReference``: per-feature deviations and the zero-shot distance; what it fits now). Mean over
``--fold-seeds`` fold shuffles.

    python benchmarks/detect_transfer.py docs/detect/features.csv [--fold-seeds 3]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from idm3d.detect.detector import Supervised, gradient_boosting, out_of_fold
from idm3d.detect.stats import auroc

_META = ("file", "label", "group", "generator", "seconds")


class _Signed:
    """The detectors on signed features standardised by all training rows (before the distance features)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, boosting: bool) -> None:
        self.mean, self.scale = x.mean(0), np.where(x.std(0) > 1e-12, x.std(0), 1.0)
        z = (x - self.mean) / self.scale
        self.model = (GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=0) if boosting
                      else LogisticRegression(max_iter=5000)).fit(z, labels)

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba((x - self.mean) / self.scale)[:, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", type=Path, help="features.csv of idm3d detect")
    parser.add_argument("--fold-seeds", type=int, default=3, help="fold shuffles to average (default 3)")
    args = parser.parse_args()
    with args.features.open() as f:
        rows = list(csv.DictReader(f))
    names = [c for c in rows[0] if c not in _META]
    x = np.array([[float(r[c]) for c in names] for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    groups = np.array([r["group"] for r in rows])
    gens = np.array([r["generator"] for r in rows])
    fakes = sorted(set(gens[y == 1]))
    fits = {"logistic, signed": lambda a, b: _Signed(a, b, boosting=False),
            "logistic, distance": Supervised.fit,
            "boosting, signed": lambda a, b: _Signed(a, b, boosting=True),
            "boosting, distance": gradient_boosting(0)}
    pairs = [(a, b) for a in fakes for b in fakes]
    print("| detector | " + " | ".join(f"{a} -> {b}" for a, b in pairs) + " |")
    print("|---|" + "--:|" * len(pairs))
    for label, fit in fits.items():
        cells = []
        for a, b in pairs:
            fit_rows, test_rows = (y == 0) | (gens == a), (y == 0) | (gens == b)
            values = [auroc(y[test_rows], out_of_fold(fit, x, y, groups, train_rows=fit_rows, test_rows=test_rows,
                                                      seed=seed)[test_rows]) for seed in range(args.fold_seeds)]
            cells.append(f"{np.mean(values):.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
