"""What a memory-efficient segment keeps alive for backward does not grow with its depth."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor

from helpers import torch_threads
from idm3d.invertible import (
    AdditiveCoupling,
    ChannelMerge,
    ChannelSplit,
    InvertibleSequence,
    OrthogonalDownsample3d,
    OrthogonalUpsample3d,
)

E = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: extra threads only spin against each other.
    with torch_threads(1):
        yield


def couplings(depth: int, memory_efficient: bool, channels: int = 8) -> InvertibleSequence:
    ops = [AdditiveCoupling(channels, cond_dim=E, flip=bool(i % 2)) for i in range(depth)]
    return InvertibleSequence(ops, memory_efficient=memory_efficient)


def saved_bytes(seg: InvertibleSequence, x: Tensor, cond: Tensor) -> tuple[int, Tensor]:
    """Bytes of the distinct storages autograd saves for backward during ``seg(x, cond)``.

    The pack hook sees every tensor saved for backward, ``ctx.save_for_backward`` of a custom
    ``autograd.Function`` included; views of one storage count once.
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = seg(x, cond)
    return sum(storages.values()), out


def _inputs(size: int = 16, channels: int = 8) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, channels, size, size, size, requires_grad=True)
    return x, torch.randn(1, E, requires_grad=True)


@pytest.mark.parametrize("depth", [4, 6])
def test_saved_bytes_do_not_grow_with_depth(depth: int) -> None:
    x, cond = _inputs()
    me = {}
    plain = {}
    for n in (depth, 2 * depth):
        me[n], out = saved_bytes(couplings(n, True), x, cond)
        out.square().sum().backward()  # the saved state is enough to backpropagate
        plain[n], out = saved_bytes(couplings(n, False), x, cond)
        out.square().sum().backward()
    # Memory-efficient: only the segment output and the conditioning are kept, at any depth.
    assert me[depth] == me[2 * depth] == x.nbytes + cond.nbytes
    assert abs(me[2 * depth] - me[depth]) <= 0.05 * me[depth]
    # Plain autograd keeps every block's activations: about twice as much for twice the blocks.
    assert 1.8 <= plain[2 * depth] / plain[depth] <= 2.2
    assert plain[depth] > 10 * me[depth]


def test_saved_bytes_unet_segment() -> None:
    """A stack state (skip + deeper part) ending in a split: still just the outputs and cond."""

    def unet(blocks: int) -> InvertibleSequence:
        inner = [AdditiveCoupling(16, cond_dim=E, flip=bool(i % 2)) for i in range(blocks)]
        ops = [ChannelSplit((2, 2)), OrthogonalDownsample3d(2), *inner, OrthogonalUpsample3d(2), ChannelMerge((2, 2))]
        return InvertibleSequence([*ops, ChannelSplit((1, 3))])

    x, cond = _inputs(channels=4)
    sizes = []
    for blocks in (2, 4):
        n, out = saved_bytes(unet(blocks), x, cond)
        assert isinstance(out, tuple)
        sum(o.square().sum() for o in out).backward()
        sizes.append(n)
    assert sizes[0] == sizes[1] == x.nbytes + cond.nbytes


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from idm3d.invertible import AdditiveCoupling, InvertibleSequence

    torch.set_num_threads(1)
    size, n = int(sys.argv[1]), int(sys.argv[2])

    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    def run(memory_efficient, depth):
        torch.manual_seed(0)
        ops = [AdditiveCoupling(8, flip=bool(i % 2)) for i in range(depth)]
        seg = InvertibleSequence(ops, memory_efficient=memory_efficient)
        x = torch.randn(1, 8, size, size, size, requires_grad=True)
        seg(x).square().sum().backward()

    run(True, 2)  # first-call allocations (kernels, thread pools, the in-place path) happen before any measurement
    growth = {}
    cases = (("me_n", True, n), ("me_2n", True, 2 * n), ("plain_n", False, n), ("plain_2n", False, 2 * n))
    for name, me, depth in cases:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak (VmHWM) to the current RSS
        except OSError as e:
            print(json.dumps({"skip": f"cannot reset the peak RSS: {e}"}))
            sys.exit(0)
        before = kib("VmRSS")
        run(me, depth)
        growth[name] = kib("VmHWM") - before
    print(json.dumps(growth))
    """
)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs /proc peak RSS and glibc malloc"
)
def test_peak_rss_subprocess() -> None:
    """Peak resident memory of forward + backward: flat in depth when memory-efficient, linear otherwise."""
    # Every allocation >= 64 KiB gets its own mapping, returned on free, so RSS follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    size, n = 24, 4
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(size), str(n)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in growth:
        pytest.skip(growth["skip"])
    # Plain autograd keeps ~2.7 MB per block here (8 ch x 24^3 fp32, ~6 saved tensors): n more blocks add ~10 MB.
    plain_extra = growth["plain_2n"] - growth["plain_n"]
    assert plain_extra > 5 * 1024, growth
    assert abs(growth["me_2n"] - growth["me_n"]) <= 0.05 * plain_extra, growth
    assert growth["me_2n"] < growth["plain_2n"] - plain_extra / 2, growth
