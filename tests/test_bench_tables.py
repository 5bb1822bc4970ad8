"""docs/measurements.md's tables and README's summary are exactly what benchmarks/tables.py makes of the JSON."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_marked_blocks_are_regenerated_from_the_json():
    tables = _tables()
    for name, text in tables.rendered().items():
        begin, end = tables.BLOCKS[name]
        content = (ROOT / name).read_text()
        block = content.split(begin, 1)[1].split(end, 1)[0]
        assert text.strip(), name
        assert block.strip() == text.strip(), f"{name}: run PYTHONPATH=src python -m benchmarks.tables"


def test_every_table_names_the_command_that_wrote_its_file():
    tables = _tables()
    for name, command in tables.COMMANDS.items():
        assert (ROOT / "docs" / "bench" / name).exists(), name
        assert re.search(rf"--json-out docs/bench/{re.escape(name)}(\s|$)", command), (name, command)
    listed = (ROOT / "docs" / "bench" / "README.md").read_text()
    for path in (ROOT / "docs" / "bench").glob("*.jsonl"):
        assert f"`{path.name}`" in listed, f"docs/bench/README.md does not list {path.name}"
