"""Train/validation/test split by case with a fixed seed, stored as JSON in the run folder."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idm3d.errors import ArgumentError, DataError

__all__ = ["Split", "load_split", "save_split", "split_cases"]

_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Disjoint lists of case ids, plus how they were drawn."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    fractions: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {
            "version": 1,
            "seed": self.seed,
            "fractions": list(self.fractions),
            **{part: list(getattr(self, part)) for part in _PARTS},
        }


def split_cases(
    case_ids: Iterable[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Split:
    """Shuffle case ids with ``seed`` and cut them into train/val/test.

    The ids are sorted before shuffling, so the split depends only on the set of ids and the seed.
    Validation and test get ``round(n * fraction)`` cases, at least one each when their fraction is
    positive and at least three cases exist; train gets the rest.

    Raises:
        ValueError: fractions negative or not summing to 1, duplicated ids, or too few cases for train.
    """
    ids = sorted(case_ids)
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise ArgumentError("fractions", f"expected (train>0, val>=0, test>=0) summing to 1, got {fractions}")
    if len(set(ids)) != len(ids):
        raise ArgumentError("case_ids", "must be unique")
    n = len(ids)
    n_val, n_test = (round(n * f) for f in fr[1:])
    if n >= 3:
        n_val, n_test = (max(k, 1) if f > 0 else k for k, f in ((n_val, fr[1]), (n_test, fr[2])))
    if n - n_val - n_test < 1:
        raise ArgumentError("case_ids", f"{n} cases cannot give a non-empty train set with fractions {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    return Split(
        train=tuple(sorted(shuffled[n_val + n_test :])),
        val=tuple(sorted(shuffled[:n_val])),
        test=tuple(sorted(shuffled[n_val : n_val + n_test])),
        seed=int(seed),
        fractions=fr,  # type: ignore[arg-type]
    )


def save_split(path: str | os.PathLike, split: Split) -> Path:
    """Write ``split`` as JSON atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(split.to_dict(), handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def load_split(path: str | os.PathLike) -> Split:
    """Read a split written by :func:`save_split`.

    Raises:
        DataError: missing file, invalid JSON, missing keys, or overlapping parts (naming the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: split file not found") from err
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a valid split JSON file ({err})") from err
    if not isinstance(data, dict) or any(k not in data for k in (*_PARTS, "seed", "fractions")):
        raise DataError(f"{path}: split file needs keys train, val, test, seed, fractions")
    parts = {}
    for part in _PARTS:
        if not isinstance(data[part], list) or not all(isinstance(c, str) for c in data[part]):
            raise DataError(f"{path}: '{part}' must be a list of case ids")
        parts[part] = tuple(data[part])
    seen: dict[str, str] = {}
    for part, ids in parts.items():
        for case in ids:
            if case in seen:
                raise DataError(f"{path}: case {case} is in both '{seen[case]}' and '{part}'")
            seen[case] = part
    try:
        fractions = tuple(float(f) for f in data["fractions"])
        seed = int(data["seed"])
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: bad seed or fractions ({err})") from err
    return Split(seed=seed, fractions=fractions, **parts)  # type: ignore[arg-type]
