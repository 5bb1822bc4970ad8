"""The mkdocs hook (``mkdocs_hooks.py``): repository links lose their link on the site, broken links do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.on_page_markdown


def _render(hook, markdown: str, src_path: str = "demo.md") -> str:
    page = SimpleNamespace(file=SimpleNamespace(src_path=src_path))
    return hook(markdown, page, {"docs_dir": str(ROOT / "docs")}, None)


def test_link_to_a_repository_file_keeps_its_text(hook):
    assert _render(hook, "with [`configs/demo.yaml`](../configs/demo.yaml).") == "with `configs/demo.yaml`."
    assert _render(hook, "see [the file](../../configs/demo.yaml#L3)", "api/nets.md") == "see the file"


@pytest.mark.parametrize(
    "markdown",
    [
        "[gone](../no_such_file.yaml)",              # broken: left for mkdocs --strict to reject
        "[page](precision.md) and [up](api/nets.md)",  # inside docs/: mkdocs resolves these
        "[site](https://example.org/x) ![img](demo-preview.png)",
        "```\n[code](../configs/demo.yaml)\n```",  # code blocks as written
    ],
)
def test_other_links_are_left_alone(hook, markdown: str):
    assert _render(hook, markdown) == markdown
