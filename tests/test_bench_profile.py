"""``idm3d bench profile``: saved-for-backward bytes per module add up and land on the right module."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idm3d.bench.profile import StepProfiler, fold
from idm3d.nets.idm_unet import IDMUNet


def _independent_total(model: nn.Module, step) -> int:
    """Bytes autograd saves in ``step`` (unique storages, parameters excluded), by one plain hook."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in alive:
            alive[ptr] = t
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def test_known_bytes_land_on_their_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.SiLU(), nn.Conv3d(4, 1, 3, padding=1))
    x = torch.randn(1, 2, 8, 8, 8)
    with StepProfiler(model) as prof:
        model(x).square().mean().backward()
    saved = {name: rec["saved_forward"] for name, rec in prof.records.items() if rec["saved_forward"]}
    # conv0 keeps its input; the SiLU keeps its input (conv0's output); conv2 keeps the SiLU's output.
    # The loss (outside every module) keeps the model output.
    assert saved == {"0": 2 * 512 * 4, "1": 4 * 512 * 4, "2": 4 * 512 * 4, "(step)": 512 * 4}
    assert prof.saved_total == sum(saved.values())
    assert all(rec["saved_backward"] == 0 for rec in prof.records.values())


@pytest.mark.parametrize("efficient", [True, False])
def test_idmunet_saved_bytes_sum_to_the_hook_total(efficient):
    torch.manual_seed(0)
    net = IDMUNet(memory_efficient=efficient)
    x, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([3, 700])

    def step() -> None:
        F.mse_loss(net(x, t), torch.zeros_like(x)).backward()

    with StepProfiler(net) as prof:
        step()
    net.zero_grad(set_to_none=True)
    total = _independent_total(net, step)
    attributed = sum(r["saved_forward"] + r["saved_backward"] for r in prof.records.values())
    assert attributed == prof.saved_total == total > 0
    core = fold(prof.records, 0)["core"]
    if efficient:  # the core keeps (almost) nothing through the forward; it rebuilds in backward
        assert core["saved_backward"] > 4 * core["saved_forward"]
        assert core["peak_backward"] > 0  # the rebuilt graphs need memory beyond what the step held
    else:
        assert core["saved_backward"] == 0
        assert core["saved_forward"] > 0
        # No peak assertion here: plain backward mostly frees, and glibc may serve what it allocates from
        # heap pages freed earlier in the step, so its RSS growth can be 0 (seen in a full-suite run).
    assert core["peak_forward"] >= 0


def test_fold_adds_saved_bytes_and_keeps_peak_maxima():
    records = {
        "a.b": {"saved_forward": 1, "saved_backward": 2, "peak_forward": 5, "peak_backward": 1},
        "a.c": {"saved_forward": 3, "saved_backward": 0, "peak_forward": 2, "peak_backward": 9},
    }
    assert fold(records, 0) == {"a": {"saved_forward": 4, "saved_backward": 2, "peak_forward": 5, "peak_backward": 9}}
