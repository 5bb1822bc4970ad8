"""The CPU allocator settings: applied by the command line, opt-out, and they really do what they say."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import idm3d.allocator as allocator
from idm3d.allocator import ENV_VAR, HUGE_PAGES_ENV, configure_from_env, enable_huge_pages, huge_pages_for
from idm3d.cli.main import main
from idm3d.errors import ConfigError

# Frees every other of 96 ~1 MiB tensors and reports how much more than the live ones stays
# resident. glibc's default raises its mmap threshold when the first 4 MiB block is freed, so the
# 1 MiB blocks come from the heap and the freed ones stay there as holes.
RETENTION = textwrap.dedent(
    """
    import re, sys, torch
    import idm3d.allocator as allocator
    if sys.argv[1] == "tuned":
        assert allocator.tune_malloc()
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
    torch.set_num_threads(1)
    base = rss()
    first = torch.ones(2**20)
    del first
    tensors = [torch.ones(2**18 + 1024 * i) for i in range(96)]
    kept = tensors[::2]
    del tensors
    print(rss() - base - sum(t.numel() * 4 for t in kept) / 2**20)
    """
)


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_tuned_malloc_returns_freed_tensors_to_the_system():
    retained = {}
    for mode in ("tuned", "system"):
        proc = _python(RETENTION, mode, env={ENV_VAR: mode})
        assert proc.returncode == 0, proc.stderr
        retained[mode] = float(proc.stdout.split()[-1])
    assert retained["tuned"] < 12, retained
    assert retained["system"] > retained["tuned"] + 30, retained  # glibc's default keeps the freed ones


@pytest.fixture
def mallopt_calls(monkeypatch):
    """Record tune_malloc calls instead of changing this test process's allocator."""
    calls: list[int] = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda *a, **k: calls.append(1) or True)
    return calls


def test_the_command_line_applies_it(monkeypatch, mallopt_calls):
    monkeypatch.setenv(ENV_VAR, "tuned")
    monkeypatch.setattr(sys, "argv", ["idm3d", "bench", "memory", "--nets", "nope"])
    assert main() == 2  # the bad option still fails as one line, after the setting
    assert mallopt_calls == [1]


@pytest.mark.parametrize("how", ["default", "env", "in-process"])
def test_opt_out_and_in_process_calls_leave_the_allocator_alone(monkeypatch, mallopt_calls, how):
    if how == "default":  # opt-in: it costs CPU time per step, which a time-budgeted run pays in steps
        monkeypatch.delenv(ENV_VAR, raising=False)
        monkeypatch.setattr(sys, "argv", ["idm3d", "bench", "memory", "--nets", "nope"])
        assert main() == 2
    elif how == "env":
        monkeypatch.setenv(ENV_VAR, "system")
        monkeypatch.setattr(sys, "argv", ["idm3d", "bench", "memory", "--nets", "nope"])
        assert main() == 2
    else:
        monkeypatch.setenv(ENV_VAR, "tuned")
        assert main(["bench", "memory", "--nets", "nope"]) == 2
    assert mallopt_calls == []


def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch, mallopt_calls, capsys):
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ConfigError, match=ENV_VAR):
        configure_from_env()
    monkeypatch.setattr(sys, "argv", ["idm3d", "bench", "memory", "--nets", "idm"])
    assert main() == 2
    err = capsys.readouterr().err
    assert "IDM3D_MALLOC" in err
    assert "Traceback" not in err
    assert mallopt_calls == []


# Whether the kernel backs madvised memory with transparent huge pages ("[never]": it cannot).
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_THP_ON = _THP_MODE.exists() and "[never]" not in _THP_MODE.read_text()

# Enables huge pages before importing torch, then touches one 64 MiB tensor and reports the
# process's huge-page-backed anonymous memory.
HUGE_PAGES = textwrap.dedent(
    """
    import os, re
    from idm3d.allocator import enable_huge_pages
    used = enable_huge_pages()
    import torch
    big = torch.ones(16 * 2**20)
    huge = re.search(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps_rollup").read())
    print(used, os.environ.get("THP_MEM_ALLOC_ENABLE"), int(huge.group(1)) // 1024 if huge else -1)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc only")
@pytest.mark.parametrize("user", [None, "0", "1"])
def test_huge_pages_are_on_unless_the_user_chose(user):
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if user is not None:
        env[HUGE_PAGES_ENV] = user
    proc = subprocess.run([sys.executable, "-c", HUGE_PAGES], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    used, value, huge_mib = proc.stdout.split()
    assert value == (user or "1")  # the user's choice is kept
    assert used == str(user != "0")
    if used == "True" and _THP_ON:
        assert int(huge_mib) >= 32, proc.stdout  # the 64 MiB tensor sits (mostly) on 2 MiB pages


def test_huge_pages_after_torch_is_imported_say_so(monkeypatch):
    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    assert "torch" in sys.modules  # as in this test process
    assert enable_huge_pages() is False  # too late: torch has read its setting
    assert HUGE_PAGES_ENV not in os.environ


@pytest.mark.parametrize(("setting", "expected"), [("tuned", "1"), ("system", None)])
def test_the_command_line_applies_huge_pages_with_tuned_before_torch_loads(setting, expected):
    code = textwrap.dedent(
        """
        import os, sys
        sys.argv = ["idm3d", "bench", "memory", "--nets", "nope"]
        from idm3d.cli.main import main
        print(main(), os.environ.get("THP_MEM_ALLOC_ENABLE"), "torch" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    env[ENV_VAR] = setting
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    # tuned: set, and torch was imported after it; system: PyTorch's default (unset)
    assert proc.stdout.split() == ["2", str(expected), "True"]


@pytest.mark.parametrize("user", [None, "0", "1"])
def test_children_start_with_the_huge_pages_of_their_setting(monkeypatch, user):
    monkeypatch.setattr(allocator, "_USER_HUGE_PAGES", user)
    assert huge_pages_for("tuned") == (user or "1")
    assert huge_pages_for("system") == (user or "0")
    with pytest.raises(ValueError, match="huge_pages_for"):
        huge_pages_for("fast")
