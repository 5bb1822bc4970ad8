"""The one way idm3d runs work in a fresh Python process: ``run_config("module:function", config)``.

Benchmarks measure each configuration in its own process (no allocator caches, high-water marks or
lazily-initialised kernels leak from one to the next), and the demo trains its directions side by side,
one process each. Both go through :func:`run_config`: the config travels as JSON on stdin, the result
comes back as one JSON line on stdout, the parent kills a child past its time or memory budget, and a
child whose parent is gone exits instead of working on.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from idm3d.allocator import ENV_VAR as ALLOCATOR_ENV
from idm3d.allocator import HUGE_PAGES_ENV, configure_from_env, huge_pages_for
from idm3d.jsonio import json_safe

__all__ = ["CHILD_ENV", "announce_baseline", "current_rss_bytes", "exit_with_parent", "run_config", "status_kib"]

MIB = 1024**2
GIB = 1024**3
RESULT_PREFIX = "IDM3D_CHILD_RESULT "
BASELINE_PREFIX = "IDM3D_CHILD_BASELINE "
CHILD_ENV = "IDM3D_CHILD"  # set in every child: "1"


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), or ``None`` where /proc is unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (``VmRSS``), or ``None`` where /proc is unavailable."""
    kib = status_kib("VmRSS", pid)
    return None if kib is None else kib * 1024


def machine_available_bytes() -> int | None:
    """Memory the machine can still give (``MemAvailable``), or ``None`` where /proc is unavailable."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def announce_baseline(rss: int | None) -> None:
    """In a child: tell the parent's watchdog the RSS to judge growth from (torch alone is hundreds of MiB)."""
    if os.environ.get(CHILD_ENV) and rss is not None:
        print(f"{BASELINE_PREFIX}{rss}", flush=True)


def exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """End this process soon after ``parent`` does, so a killed parent leaves no orphans working on.

    A watcher thread, not ``PR_SET_PDEATHSIG``: that signal follows the parent *thread* that started the
    process. Checkpoints are atomic, so an exit mid-write loses nothing committed.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="idm3d-parent-watch", daemon=True).start()


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)  # the folder holding the idm3d package


def run_config(
    target: str,
    config: Mapping[str, Any],
    *,
    timeout_s: float | None = None,
    growth_limit_bytes: int | None = None,
    machine_reserve_bytes: int = 512 * MIB,
    poll_s: float = 0.02,
) -> dict[str, Any]:
    """Run ``target`` (``"module:function"``, called with ``config``) in a fresh Python process.

    The child sets ``config["threads"]`` torch threads when given and applies the allocator setting
    ``config["malloc"]`` (default: the ``IDM3D_MALLOC`` of this process, else ``tuned``).

    Args:
        target: importable ``module:function`` returning a JSON-serialisable dict.
        config: passed to the function; echoed into the result.
        timeout_s: kill the child after this many seconds (``status: "timeout"``).
        growth_limit_bytes: kill the child once its RSS exceeds the baseline it announced by this
            much (``status: "over_budget"``), so a probe never drives the machine into swap/OOM.
        machine_reserve_bytes: with ``growth_limit_bytes``, also kill the child once the machine has less
            than this left (``status: "machine_full"``): a budget above what the machine holds beside the
            child's baseline (large inputs) would otherwise end in the kernel's OOM killer.
        poll_s: watchdog polling interval.

    Returns:
        ``{**config, **result, "status": ...}``; ``status`` is ``ok``, ``oom``, ``error``, ``timeout``,
        ``over_budget`` or ``machine_full``; failures carry ``error`` (one line) and, for an exception,
        ``error_type`` (its class name) and ``error_module``.
    """
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    env[ALLOCATOR_ENV] = str(config.get("malloc", env.get(ALLOCATOR_ENV, "tuned")))
    env[HUGE_PAGES_ENV] = huge_pages_for(env[ALLOCATOR_ENV])  # read when the child imports torch
    proc = subprocess.Popen(
        [sys.executable, "-m", "idm3d.children", target, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    state: dict[str, Any] = {"result": None, "baseline": None, "stderr": []}

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                state["result"] = json.loads(line[len(RESULT_PREFIX) :])
            elif line.startswith(BASELINE_PREFIX):
                state["baseline"] = int(line[len(BASELINE_PREFIX) :])

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            state["stderr"] = [*state["stderr"][-40:], line.rstrip()]

    readers = [threading.Thread(target=fn, daemon=True) for fn in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(dict(config)))
        proc.stdin.close()
    except BrokenPipeError:  # the child died at start-up; its stderr says why
        pass

    killed: str | None = None
    watched_peak = 0
    started = time.monotonic()
    while proc.poll() is None:
        rss = current_rss_bytes(proc.pid) or 0
        watched_peak = max(watched_peak, rss)
        if growth_limit_bytes is not None:
            # Before the child announces its baseline, allow 1 GiB for torch + model + inputs.
            base = state["baseline"] if state["baseline"] is not None else GIB
            if rss > base + growth_limit_bytes:
                killed = "over_budget"
            elif (machine_available_bytes() or machine_reserve_bytes) < machine_reserve_bytes:
                killed = "machine_full"
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            killed = "timeout"
        if killed:
            proc.kill()
            break
        time.sleep(poll_s)
    proc.wait()
    for reader in readers:
        reader.join(timeout=5)

    out: dict[str, Any] = dict(config)
    out["watchdog_peak_rss_mib"] = watched_peak / MIB
    if killed:
        out.update(status=killed, error=f"child killed ({killed}) after {time.monotonic() - started:.1f} s")
    elif state["result"] is not None:
        out.update(state["result"])
    else:
        tail = [line for line in state["stderr"] if line.strip()]
        out.update(status="error", error=(tail[-1] if tail else f"child exited with code {proc.returncode}"))
    return out


def _child_main(argv: Sequence[str]) -> int:
    if len(argv) not in (1, 2) or ":" not in argv[0]:
        print("usage: python -m idm3d.children module:function [PARENT_PID] < config.json", file=sys.stderr)
        return 2
    if len(argv) == 2:
        exit_with_parent(int(argv[1]))
    module_name, func_name = argv[0].split(":", 1)
    config = json.loads(sys.stdin.read() or "{}")
    import torch  # after the allocator environment is in place (torch reads the huge-page switch once)

    try:
        malloc = configure_from_env()
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        func = getattr(importlib.import_module(module_name), func_name)
        result = dict(func(config))
        result.setdefault("status", "ok")
        result["malloc_settings"] = malloc
        result["huge_pages"] = os.environ.get(HUGE_PAGES_ENV, "").strip() == "1"
    except torch.OutOfMemoryError as err:
        result = {"status": "oom", "error": str(err).splitlines()[0]}
    except Exception as err:
        traceback.print_exc()
        first = str(err).splitlines()[0] if str(err) else ""
        result = {"status": "error", "error": f"{type(err).__name__}: {first}", "error_type": type(err).__name__,
                  "error_module": type(err).__module__, "message": str(err)}
    print(RESULT_PREFIX + json.dumps(json_safe(result), allow_nan=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
