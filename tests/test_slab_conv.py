"""Depth-slab convolution: equal to Conv3d forward and backward (fp64), halos, odd sizes, state dicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idm3d.invertible.slab_conv import SlabConv3d, slab_conv3d, slab_ranges


def _bytes_for_planes(x: torch.Tensor, cout: int, planes: int, kernel: int) -> int:
    """slab_bytes that makes slab_conv3d use ``planes`` output planes per slab."""
    plane = x.shape[0] * (x.shape[1] + cout) * x.shape[3] * x.shape[4] * x.element_size()
    return (planes + 2 * (kernel // 2)) * plane


@pytest.mark.parametrize(
    ("batch", "cin", "cout", "kernel", "shape", "groups", "bias", "planes"),
    [
        (1, 3, 5, 3, (11, 6, 7), 1, True, 1),  # one plane per slab: every slab is all halo
        (2, 4, 6, 3, (9, 5, 5), 2, True, 4),  # depth not a multiple of the slab, groups
        (1, 2, 3, 5, (13, 4, 6), 1, False, 3),  # halo of 2 planes, no bias
        (2, 2, 2, 1, (7, 3, 3), 1, True, 2),  # 1x1x1: no halo
        (1, 3, 2, 3, (5, 4, 4), 1, True, 4),  # last slab of one plane
    ],
)
def test_slab_conv_equals_conv3d_forward_and_backward(batch, cin, cout, kernel, shape, groups, bias, planes):
    torch.manual_seed(0)
    x = torch.randn(batch, cin, *shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin // groups, kernel, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    y = slab_conv3d(x, w, b, groups, slab_bytes=_bytes_for_planes(x, cout, planes, kernel))
    assert type(y.grad_fn).__name__ == "_SlabConv3dFunctionBackward"  # really split
    ref = F.conv3d(x, w, b, padding=kernel // 2, groups=groups)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_slab_conv_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    slab = _bytes_for_planes(x, 3, 2, 3)
    assert torch.autograd.gradcheck(lambda *a: slab_conv3d(*a, slab_bytes=slab), (x, w, b))


def test_small_inputs_take_one_ordinary_call():
    x = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    y = slab_conv3d(x, torch.randn(3, 2, 3, 3, 3), None)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"


def test_slabs_save_only_the_input_and_weight():
    # The memory bound: whatever the slab count, backward keeps the input and the weight only.
    saved: list[int] = []
    x = torch.randn(1, 4, 16, 8, 8, requires_grad=True)
    conv = SlabConv3d(4, 4, 3, slab_bytes=_bytes_for_planes(x, 4, 2, 3))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        conv(x)
    assert sorted(saved) == sorted([x.numel(), conv.weight.numel()])


def test_module_matches_conv3d_and_shares_its_state_dict():
    torch.manual_seed(2)
    plain = nn.Conv3d(3, 4, 3, padding=1).double()
    slab = SlabConv3d(3, 4, 3, slab_bytes=1).double()  # one plane per slab
    slab.load_state_dict(plain.state_dict())
    assert set(slab.state_dict()) == set(plain.state_dict())
    x = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(slab(x), plain(x), rtol=0, atol=1e-12)
    slab(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(slab.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slab.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


def test_autocast_runs_slabs_in_the_autocast_dtype():
    torch.manual_seed(3)
    conv = SlabConv3d(2, 3, 3, slab_bytes=1)
    x = torch.randn(1, 2, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        ref = F.conv3d(x, conv.weight, conv.bias, padding=1)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert conv.weight.grad is not None
    assert conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: SlabConv3d(2, 2, 2), "kernel_size must be odd"),
        (lambda: SlabConv3d(2, 2, 3, slab_bytes=0), "slab_bytes"),
        (lambda: slab_conv3d(torch.zeros(1, 2, 4, 4), torch.zeros(2, 2, 3, 3, 3)), r"\(B, C, D, H, W\)"),
        (lambda: slab_conv3d(torch.zeros(1, 2, 4, 4, 4), torch.zeros(2, 2, 2, 3, 3)), "kernel sizes must be odd"),
        (lambda: slab_ranges(0, 4), "depth and planes"),
    ],
)
def test_bad_arguments_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_slab_ranges_cover_the_depth_once():
    assert slab_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert slab_ranges(3, 8) == [(0, 3)]


def test_channels_last_input_takes_the_slab_path_exactly():
    """The memory-efficient IDMUNet feeds channels-last maps (its sub-networks' layout): same results."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    w = torch.randn(3, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = slab_conv3d(x, w, b, slab_bytes=_bytes_for_planes(x, 3, 3, 3))
    assert type(y.grad_fn).__name__ == "_SlabConv3dFunctionBackward"
    ref = F.conv3d(x, w, b, padding=1)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, [x, w, b], grad), torch.autograd.grad(ref, [x, w, b], grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
