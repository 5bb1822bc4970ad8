"""The CPU-only tricks stay on CPU: checked on the ``meta`` device, which stands for any non-CPU one here.

docs/gpu/README.md lists each trick and why it is gated (or device-neutral).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idm3d.invertible import linalg
from idm3d.invertible.norm_act import group_norm_silu
from idm3d.invertible.slab_conv import DEFAULT_SLAB_BYTES, slab_conv3d


@pytest.fixture(autouse=True)
def _no_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    # autocast knows no "meta" device; no test here runs under autocast
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *_: False)


def _split(x: torch.Tensor, slab_bytes: int = DEFAULT_SLAB_BYTES) -> bool:
    y = slab_conv3d(x, torch.empty(16, x.shape[1], 3, 3, 3, device=x.device), None, slab_bytes=slab_bytes)
    return type(y.grad_fn).__name__ == "_SlabConv3dFunctionBackward"


def test_default_slab_size_applies_on_cpu_only() -> None:
    # 16 -> 16 channels at 256^3, fp32: 2 GiB of input + output, 4x the CPU default's 512 MiB
    x = torch.empty(1, 16, 256, 256, 256, device="meta", requires_grad=True)
    assert not _split(x)  # off CPU the default splits nothing that 32-bit indexing can hold ...
    assert _split(torch.empty(1, 64, 512, 256, 256, device="meta", requires_grad=True))  # ... splits beyond
    assert _split(x, slab_bytes=DEFAULT_SLAB_BYTES // 2)  # an explicit slab size applies on any device
    small = torch.zeros(1, 2, 12, 4, 4, requires_grad=True)
    plane = 1 * (2 + 16) * 4 * 4 * 4
    assert _split(small, slab_bytes=5 * plane)


def test_channels_last_group_norm_silu_is_cpu_only() -> None:
    norm = nn.GroupNorm(2, 4, device="meta")
    x = torch.empty(1, 4, 4, 4, 4, device="meta")
    assert group_norm_silu(x, norm, channels_last=True).is_contiguous()  # no channels-last copy off CPU
    cpu = group_norm_silu(torch.randn(1, 4, 4, 4, 4), nn.GroupNorm(2, 4), channels_last=True)
    assert cpu.is_contiguous(memory_format=torch.channels_last_3d)
    assert not cpu.is_contiguous()


def test_serial_lapack_switch_is_cpu_only(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    a = torch.empty(4, 200, 200, device="meta")
    linalg.solve(a, torch.empty(4, 200, 3, device="meta"))
    assert calls == []  # off CPU the thread count is left alone
    eye = torch.eye(200).expand(4, 200, 200).contiguous()
    linalg.solve(eye, torch.ones(4, 200, 3))
    assert calls == [1, 2]  # on CPU: one thread for the batched LU, then back
