"""Safe-loading audit: nothing in ``src/`` unpickles or loads YAML unsafely (AST walk plus a text backstop)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

_UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all", "Loader",
                "UnsafeLoader", "FullLoader"}
_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loading(source: str) -> list[str]:
    """Unpickling or unsafe-YAML constructs in Python ``source``, as ``"line: what"``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"{node.lineno}: imports {n}" for n in names if n.split(".")[0] in _PICKLERS]
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in {a.name for a in node.names}:
                found.append(f"{node.lineno}: from torch import load")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner, attr = node.value.id, node.attr
            if owner == "yaml" and attr in _UNSAFE_YAML:
                found.append(f"{node.lineno}: yaml.{attr}")
            if owner in _PICKLERS:
                found.append(f"{node.lineno}: {owner}.{attr}")
        elif isinstance(node, ast.Call):
            kwargs = {k.arg: k.value for k in node.keywords}
            func = ast.unparse(node.func)
            if func == "torch.load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{node.lineno}: torch.load without weights_only=True")
            flag = kwargs.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{node.lineno}: {func}(allow_pickle=...)")
    return found


def test_the_audit_detects_unsafe_loading():
    # The call is spelled apart so that plain-text scans of this repository do not flag this test's samples.
    load = "torch" + ".load"
    bad = ("import pickle\nimport yaml, torch, numpy as np\nyaml.load(s, Loader=yaml.Loader)\nyaml.unsafe_load(s)\n"
           f"{load}(p)\n{load}(p, weights_only=False)\nnp.load(p, allow_pickle=True)\npickle.loads(b)\n")
    lines = {int(f.split(":")[0]) for f in unsafe_loading(bad)}
    assert lines == {1, 3, 4, 5, 6, 7, 8}
    good = "import yaml, torch\nyaml.safe_load(s)\ntorch.load(p, weights_only=True, map_location='cpu')\n"
    assert unsafe_loading(good) == []


def test_src_never_unpickles_or_loads_yaml_unsafely():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [f"{p.relative_to(SRC)}:{hit}" for p in files for hit in unsafe_loading(p.read_text(encoding="utf-8"))]
    assert found == []
    # Plain-text backstop for code the AST walk would not see (e.g. built by strings).
    text = "\n".join(p.read_text(encoding="utf-8") for p in files)
    assert not re.search(r"\bpickle\.loads?\(|yaml\.(unsafe_|full_)?load\(|allow_pickle\s*=\s*True", text)
    for call in re.findall(r"torch\.load\([^)]*\)", text):
        assert "weights_only=True" in call, call
