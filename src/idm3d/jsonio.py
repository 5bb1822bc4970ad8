"""Strict JSON output: the one rule for values JSON cannot hold (NaN and infinities are written as ``null``).

Metrics logs, checkpoints' states, evaluation reports and benchmark records all go through
:func:`json_safe`, so any JSON reader accepts every file idm3d writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["dumps", "json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with NaN/Inf floats replaced by ``None`` (nested mappings, lists and tuples too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (see :func:`json_safe`); with ``indent`` it ends in a newline."""
    text = json.dumps(json_safe(value), indent=indent, allow_nan=False)
    return text + "\n" if indent is not None else text
