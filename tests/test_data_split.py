"""Case-level train/val/test split: deterministic, disjoint, saved and reloaded as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idm3d.data.split import Split, load_split, save_split, split_cases
from idm3d.errors import DataError

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 41)]


@pytest.mark.parametrize("n", [3, 7, 40])
@pytest.mark.parametrize("seed", [0, 123])
def test_split_is_deterministic_disjoint_and_complete(n: int, seed: int) -> None:
    ids = IDS[:n]
    a = split_cases(ids, seed=seed)
    b = split_cases(list(reversed(ids)), seed=seed)  # input order does not matter
    assert a == b
    parts = [set(a.train), set(a.val), set(a.test)]
    assert set.union(*parts) == set(ids)
    assert sum(len(p) for p in parts) == n
    assert all(len(p) >= 1 for p in parts)


def test_sizes_follow_fractions_and_seed_changes_membership() -> None:
    a = split_cases(IDS, (0.7, 0.2, 0.1), seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (28, 8, 4)
    assert split_cases(IDS, (0.7, 0.2, 0.1), seed=1).test != a.test
    no_test = split_cases(IDS, (0.9, 0.1, 0.0), seed=0)
    assert no_test.test == ()
    assert len(no_test.val) == 4


def test_save_load_roundtrip(tmp_path: Path) -> None:
    split = split_cases(IDS, seed=5)
    path = save_split(tmp_path / "run" / "split.json", split)
    assert load_split(path) == split
    assert json.loads(path.read_text())["seed"] == 5


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not a valid split"),
        (json.dumps({"train": ["a"]}), "needs keys"),
        (json.dumps({"train": ["a"], "val": ["a"], "test": [], "seed": 0, "fractions": [0.8, 0.2, 0]}), "both"),
        (json.dumps({"train": "a", "val": [], "test": [], "seed": 0, "fractions": [1, 0, 0]}), "list"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(DataError, match=fragment) as info:
        load_split(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("ids", "fractions"),
    [(IDS, (0.5, 0.5, 0.5)), (IDS, (0.0, 0.5, 0.5)), (["a", "a", "b"], (0.8, 0.1, 0.1)), (["a"], (0.0, 1.0, 0.0))],
)
def test_split_validation(ids: list[str], fractions: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match=r"^(fractions|case_ids): "):
        split_cases(ids, fractions)


def test_split_dataclass_to_dict() -> None:
    split = Split(("a",), ("b",), (), 3, (0.5, 0.5, 0.0))
    assert split.to_dict()["train"] == ["a"]
    assert split.to_dict()["version"] == 1
