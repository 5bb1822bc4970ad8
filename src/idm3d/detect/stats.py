"""AUROC with a bootstrap 95 % interval, per-feature AUROCs and ROC curves (scikit-learn's metrics)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["auroc", "auroc_with_ci", "feature_aurocs", "roc_points"]


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).astype(int).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"scores: {scores.size} values for {labels.size} labels")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError("labels: need both real (0) and generated (1) volumes")
    if not np.isfinite(scores).all():
        raise ValueError("scores: contain NaN or Inf")
    return labels, scores


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve; 1 = every generated volume scores above every real one (label 1 = generated)."""
    labels, scores = _check(np.asarray(labels), np.asarray(scores))
    return float(roc_auc_score(labels, scores))


def auroc_with_ci(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    groups: Sequence[object] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int]:
    """AUROC and its percentile bootstrap interval.

    With ``groups`` whole groups are resampled (a volume's patches, or a real volume with the fakes made from
    it, stay together), which keeps the interval honest when rows are not independent.

    Returns:
        ``{"auroc", "ci_low", "ci_high", "n_real", "n_fake", "n_boot"}`` (``n_boot``: the draws that held both
        classes and were used).
    """
    labels, scores = _check(np.asarray(labels), np.asarray(scores))
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"n_boot/level: expected >= 1 and in (0, 1), got {n_boot} and {level}")
    keys = np.arange(labels.size) if groups is None else np.unique(np.asarray(groups, dtype=object).astype(str),
                                                                   return_inverse=True)[1]
    members = [np.flatnonzero(keys == g) for g in range(int(keys.max()) + 1)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if labels[rows].min() != labels[rows].max():
            draws.append(roc_auc_score(labels[rows], scores[rows]))
    tail = (1 - level) / 2
    low, high = (np.quantile(draws, [tail, 1 - tail]) if draws else (np.nan, np.nan))
    return {"auroc": float(roc_auc_score(labels, scores)), "ci_low": float(low), "ci_high": float(high),
            "n_real": int((labels == 0).sum()), "n_fake": int((labels == 1).sum()), "n_boot": len(draws)}


def feature_aurocs(labels: np.ndarray, features: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """AUROC of each feature column used as a score on its own (below 0.5: generated volumes score lower)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(names):
        raise ValueError(f"features: expected (rows, {len(names)}), got {features.shape}")
    return {name: auroc(labels, features[:, j]) for j, name in enumerate(names)}


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve."""
    labels, scores = _check(np.asarray(labels), np.asarray(scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr
