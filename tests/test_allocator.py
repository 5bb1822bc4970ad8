"""The CPU allocator setting: applied by the command line, opt-out, and it really returns memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from idm3d.allocator import ENV_VAR, configure_from_env
from idm3d.errors import ConfigError

# Frees mid-sized tensors in a fragmenting order, as a training step does, and reports how much
# of them stays resident afterwards.
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
    for _ in range(3):
        tensors = [torch.ones(2**20 + 4096 * i) for i in range(48)]  # ~4 MiB each, 190 MiB
        kept = tensors[::2]
        del tensors, kept
    print(rss() - base)
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
    assert retained["tuned"] < 40, retained
    assert retained["system"] > retained["tuned"] + 100, retained  # glibc's default keeps them


CLI = textwrap.dedent(
    """
    import sys
    import idm3d.allocator as allocator
    from idm3d.cli.main import main
    sys.argv = ["idm3d", "bench", "memory", "--nets", "nope"]
    code = main()
    print(code, allocator.applied_settings())
    """
)


def test_the_command_line_applies_it_and_env_opts_out():
    tuned = _python(CLI, env={ENV_VAR: "tuned"})
    assert tuned.stdout.split()[0] == "2", tuned.stdout + tuned.stderr
    assert "mmap_threshold" in tuned.stdout, tuned.stdout
    system = _python(CLI, env={ENV_VAR: "system"})
    assert system.stdout.strip() == "2 None", system.stdout + system.stderr


def test_in_process_calls_leave_the_allocator_alone():
    code = CLI.replace('sys.argv = ["idm3d", "bench", "memory", "--nets", "nope"]\ncode = main()',
                       'code = main(["bench", "memory", "--nets", "nope"])')
    proc = _python(code, env={ENV_VAR: "tuned"})
    assert proc.stdout.strip() == "2 None", proc.stdout + proc.stderr


def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ConfigError, match=ENV_VAR):
        configure_from_env()
    proc = _python(CLI, env={ENV_VAR: "fast"})
    assert proc.stdout.split()[0] == "2"
    assert "IDM3D_MALLOC" in proc.stderr
    assert "Traceback" not in proc.stderr
