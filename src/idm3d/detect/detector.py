"""The two detectors on a feature table: a zero-shot score fitted on real volumes only, and a supervised one.

* :class:`ZeroShot`: each feature standardised by the real volumes' mean and spread, then the Mahalanobis
  distance under a Ledoit-Wolf shrunk covariance of the reals (stable with fewer volumes than features).
  No generated volume is seen; a volume far from the reals in any direction scores high.
* :class:`Supervised`: scikit-learn logistic regression (kept as plain numbers, so a fitted detector is
  JSON, never a pickle); :func:`gradient_boosting` is the non-linear alternative that cross-validation also
  reports. Both see how far a volume lies from the real training volumes (:class:`RealReference`): each
  feature's *deviation* ``|x - mean_real| / std_real`` and the zero-shot distance, not the signed features.
  Fakes of different generators leave the reals in different directions, so a signed boundary fitted on
  one generator's fakes misses another's; how far they lie transfers (docs/detect.md, cross-generator AUROC).

:func:`out_of_fold` scores every row by a model fitted on other groups only (``StratifiedGroupKFold``), so
the fakes made from a real volume never sit on the other side of a fold from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

__all__ = ["RealReference", "Supervised", "ZeroShot", "gradient_boosting", "n_folds", "out_of_fold"]

_EPS = 1e-12


def _matrix(x: np.ndarray, n_features: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or (n_features is not None and x.shape[1] != n_features):
        raise ValueError(f"features: expected (rows, {n_features or 'features'}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features: contain NaN or Inf")
    return x


@dataclass
class ZeroShot:
    """Mahalanobis distance to the real volumes' features (fitted on reals only)."""

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    reference: np.ndarray  # the calibration reals' own scores, for percentiles

    @classmethod
    def fit(cls, real: np.ndarray) -> ZeroShot:
        """Fit on the ``(n_real, n_features)`` features of real volumes (at least 2)."""
        real = _matrix(real)
        if real.shape[0] < 2:
            raise ValueError(f"real: the zero-shot score needs at least 2 real volumes, got {real.shape[0]}")
        mean, scale = real.mean(0), real.std(0)
        scale = np.where(scale > _EPS, scale, 1.0)
        z = (real - mean) / scale
        precision = LedoitWolf(assume_centered=True).fit(z).precision_
        model = cls(mean, scale, precision, np.zeros(0))
        model.reference = model.score(real)
        return model

    def score(self, x: np.ndarray) -> np.ndarray:
        """Distance of each row from the reals (higher = less like them)."""
        z = (_matrix(x, self.mean.size) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Share (0-100) of the calibration reals scoring below each score."""
        return 100.0 * (self.reference[None, :] < np.asarray(scores)[:, None]).mean(1)

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("mean", "scale", "precision", "reference")}

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShot:
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "precision", "reference")))


@dataclass
class RealReference:
    """How far a volume lies from the real training volumes: what the supervised detectors see.

    Per row, each feature's absolute deviation from the reals' mean in units of their spread, then the
    :class:`ZeroShot` distance to the reals (one more column).
    """

    zero_shot: ZeroShot

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray) -> RealReference:
        return cls(ZeroShot.fit(x[np.asarray(labels) == 0]))

    def features(self, x: np.ndarray) -> np.ndarray:
        zs = self.zero_shot
        return np.concatenate([np.abs((_matrix(x, zs.mean.size) - zs.mean) / zs.scale), zs.score(x)[:, None]], 1)

    def training_features(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """:meth:`features` of the rows it was fitted on, each real's distance left-one-out: as far as a new
        real would lie, so the classifier does not learn that reals sit closer than unseen ones do."""
        out = self.features(x)
        real = np.flatnonzero(np.asarray(labels) == 0)
        if real.size >= 3:  # the zero-shot fit needs 2 reals
            for i in real:
                others = np.delete(real, np.flatnonzero(real == i))
                out[i, -1] = ZeroShot.fit(x[others]).score(x[i : i + 1])[0]
        return out


@dataclass
class Supervised:
    """Logistic regression on :class:`RealReference` features: ``probability`` of being generated.

    Without ``zero_shot`` (``detector.json`` files written before these features, ``"features": "signed"``
    or absent) it is the older detector on signed features standardised by all training rows, and scores as
    it did.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    zero_shot: ZeroShot | None = None

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray, c: float = 1.0) -> Supervised:
        x, labels = _matrix(x), np.asarray(labels).astype(int)
        if set(np.unique(labels)) != {0, 1}:
            raise ValueError("labels: need both real (0) and generated (1) volumes")
        ref = RealReference.fit(x, labels)
        lr = LogisticRegression(C=c, max_iter=5000).fit(ref.training_features(x, labels), labels)
        return cls(ref.zero_shot.mean, ref.zero_shot.scale, lr.coef_[0].copy(), float(lr.intercept_[0]),
                   ref.zero_shot)

    def score(self, x: np.ndarray) -> np.ndarray:
        if self.zero_shot is None:
            z = (_matrix(x, self.mean.size) - self.mean) / self.scale
        else:
            z = RealReference(self.zero_shot).features(x)
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def to_dict(self) -> dict:
        out = {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
               "intercept": self.intercept, "features": "signed" if self.zero_shot is None else "distance"}
        return out if self.zero_shot is None else {**out, "zero_shot": self.zero_shot.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Supervised:
        kind = data.get("features", "signed")  # files without the key predate the distance features
        if kind not in ("signed", "distance"):
            raise ValueError(f"supervised detector: unknown features {kind!r} (expected signed or distance)")
        zero_shot = ZeroShot.from_dict(data["zero_shot"]) if kind == "distance" else None
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef")),
                   float(data["intercept"]), zero_shot)


class _Boosting:
    def __init__(self, x: np.ndarray, labels: np.ndarray, seed: int) -> None:
        self.reference = RealReference.fit(x, labels)
        self.model = GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=seed).fit(
            self.reference.training_features(x, labels), labels)

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(self.reference.features(x))[:, 1]


def gradient_boosting(seed: int = 0) -> Callable[[np.ndarray, np.ndarray], _Boosting]:
    """A ``fit(x, labels)`` for scikit-learn gradient boosting (depth-2 trees) on :class:`RealReference`
    features, seeded."""
    return lambda x, labels: _Boosting(x, labels, seed)


def n_folds(labels: np.ndarray, groups: np.ndarray, wanted: int = 5) -> int:
    """Folds that ``StratifiedGroupKFold`` can make: at most ``wanted``, at most the groups holding each class.

    Raises:
        ValueError: fewer than 2 groups with a real and 2 with a generated volume.
    """
    labels, groups = np.asarray(labels), np.asarray(groups, dtype=object).astype(str)
    per_class = [len(set(groups[labels == k])) for k in (0, 1)]
    if min(per_class) < 2:
        raise ValueError(f"volumes: cross-validation needs at least 2 real and 2 generated volumes (groups), "
                         f"got {per_class[0]} and {per_class[1]}")
    return min(wanted, *per_class)


def out_of_fold(
    fit: Callable[[np.ndarray, np.ndarray], object],
    x: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[object],
    *,
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Score each row with a model fitted on the other folds' groups (NaN for rows not in ``test_rows``).

    Args:
        fit: ``fit(x, labels) -> model`` with ``model.score(x)``; a zero-shot fit gets only real rows.
        x, labels, groups: the feature table, 0 real / 1 generated, the group of each row.
        train_rows: bool mask of rows a fold may fit on (e.g. one generator's fakes); default all.
        test_rows: bool mask of rows to score (e.g. the other generator's fakes); default all.
        folds: requested folds (capped by :func:`n_folds`).
        seed: fold shuffling.
    """
    x, labels = _matrix(x), np.asarray(labels).astype(int)
    groups = np.asarray(groups, dtype=object).astype(str)
    train_rows = np.ones(labels.size, bool) if train_rows is None else np.asarray(train_rows, bool)
    test_rows = np.ones(labels.size, bool) if test_rows is None else np.asarray(test_rows, bool)
    splitter = StratifiedGroupKFold(n_splits=n_folds(labels, groups, folds), shuffle=True, random_state=seed)
    out = np.full(labels.size, np.nan)
    for train, test in splitter.split(x, labels, groups):
        train = train[train_rows[train]]
        test = test[test_rows[test]]
        if test.size:
            out[test] = fit(x[train], labels[train]).score(x[test])
    return out
