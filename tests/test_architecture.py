"""The import arrows of docs/architecture.md, checked on the source: cli -> detect/demo/bench -> inference -> training
-> runs -> {diffusion, data, nets} -> invertible, with the helpers (errors, devices, jsonio, ...) below everything,
and the lab (benchmarks/) outside the wheel."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "idm3d"
LEAVES = {"errors", "devices", "jsonio", "metrics", "lazy", "allocator", "children"}  # import no idm3d package
# package -> the idm3d packages and modules it may import (besides itself and the leaves)
ALLOWED: dict[str, set[str]] = {
    "invertible": set(),
    "nets": {"invertible"},
    "domain": {"nets", "invertible"},  # depth sharding: swaps layers of nets/invertible for sharded ones
    "diffusion": set(),
    "data": set(),
    "runs": {"diffusion", "data", "nets", "invertible", "idm3d"},  # idm3d: __version__ for run records
    "training": {"runs", "diffusion", "data", "nets", "invertible", "idm3d", "domain"},
    "inference": {"training", "runs", "diffusion", "data", "nets", "invertible", "domain"},
    "bench": {"runs", "diffusion", "data", "nets", "invertible", "idm3d"},
    "demo": {"inference", "training", "runs", "diffusion", "data", "nets", "invertible", "bench"},
    "detect": {"inference", "runs", "diffusion", "data", "nets", "invertible"},
    "cli": {"detect", "demo", "bench", "inference", "training", "runs", "diffusion", "data", "nets", "invertible"},
}


def _imports(path: Path) -> set[str]:
    """The idm3d packages and root modules a file imports (``from idm3d import devices`` counts as ``devices``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "idm3d" and not node.level:
            found.update(a.name if a.name in LEAVES else "idm3d" for a in node.names)
            continue
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(n.split(".")[1] if "." in n else "idm3d" for n in names if n.split(".")[0] == "idm3d")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str):
    bad = {}
    for path in sorted((SRC / package).rglob("*.py")):
        extra = _imports(path) - ALLOWED[package] - LEAVES - {package}
        if extra:
            bad[str(path.relative_to(SRC))] = sorted(extra)
    assert not bad, f"imports against the arrows of docs/architecture.md: {bad}"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_helpers_import_no_idm3d_package(leaf: str):
    assert _imports(SRC / f"{leaf}.py") <= LEAVES


def test_the_wheel_holds_no_lab():
    """Studies, probes and table generators live in benchmarks/ (the lab), which nothing in src/idm3d imports."""
    importers = sorted(
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "benchmarks")
        or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "benchmarks" for a in node.names))
    )
    assert not importers, f"src/idm3d imports the lab: {importers}"
    lab_names = [p.name for p in SRC.rglob("*.py") if any(w in p.stem for w in ("study", "probe", "tables"))]
    assert not lab_names, f"studies, probes or table generators in the wheel: {lab_names}"


def test_every_package_is_a_regular_package():
    """A folder of modules without ``__init__.py`` imports as a namespace package but is left out of the wheel
    and invisible to the API docs."""
    missing = sorted(
        str(d.relative_to(SRC)) for d in {p.parent for p in SRC.rglob("*.py")} if not (d / "__init__.py").exists()
    )
    assert not missing, f"packages without __init__.py: {missing}"


def test_no_source_file_is_git_ignored():
    """A clean clone holds every file of the package: an ignore pattern meant for run folders (``runs/``) once
    hid ``src/idm3d/runs/__init__.py``, so CI's docs build could not find ``idm3d.runs``."""
    root = SRC.parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for p in SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [str(p.relative_to(root)) for p in (root / "tests").rglob("*.py")]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=root, input="\n".join(files),
        capture_output=True, text=True, check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    assert not done.stdout.split(), f"git-ignored source files: {done.stdout.split()}"
