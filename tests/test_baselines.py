"""Baselines: PatchDDM-3D as published, checkpointed MONAI and PatchDDM nets equal their plain selves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn

from idm3d.bench.nets import NET_LABELS, ConvStack, build_net, in_channels, parse_nets
from idm3d.errors import ConfigError
from idm3d.nets.baselines import checkpoint_blocks, count_parameters, monai_kwargs, monai_unet
from idm3d.nets.patchddm import PatchDDMUNet

PAPER_PARAMETERS = 24.26e6  # PatchDDM-3D's network as its paper reports it


def test_patchddm_has_the_published_size_and_layout():
    with torch.device("meta"):
        net = PatchDDMUNet()
    assert net.in_channels == 8
    assert net.out_channels == 1
    assert net.size_multiple == 64
    assert abs(count_parameters(net) - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms
    assert all(m.num_groups == 29 for m in norms)
    assert not any("attn" in name or "attention" in name for name, _ in net.named_modules())
    blocks = [m for m in net.encoder if isinstance(m, DiffusionUNetResnetBlock)]
    assert len(blocks) == 2 * 7
    assert len(net.decoder) == 3 * 7
    assert len(net.middle) == 2
    assert [m.out_channels for m in blocks[::2]] == [29, 87, 116, 116, 116, 116, 116]
    strided = [m for m in net.encoder if isinstance(m, nn.Conv3d)]
    assert len(strided) == 6
    assert all(m.stride == (2, 2, 2) for m in strided)


def _small_patchddm(checkpoint: bool) -> PatchDDMUNet:
    return PatchDDMUNet(in_channels=2, channels=8, channel_mult=(1, 2, 2), norm_num_groups=4, checkpoint=checkpoint)


def _grads(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = net(x, t)
    F.mse_loss(out, torch.ones_like(out)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _count_calls(modules: list[nn.Module]) -> list[int]:
    calls = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _first_norm(block: nn.Module) -> nn.Module:
    return next(m for m in block.modules() if isinstance(m, nn.GroupNorm))


def _nonzero_output_layers(net: nn.Module) -> None:
    # Zero-initialised last convolutions would make most gradients trivially zero.
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)


@pytest.mark.parametrize("batch", [1, 2])
def test_checkpointed_patchddm_gives_plain_gradients_and_recomputes(batch):
    torch.manual_seed(0)
    plain = _small_patchddm(False).double()
    _nonzero_output_layers(plain)
    ckpt = _small_patchddm(True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 2, 16, 16, 16, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,))
    out_p, grads_p = _grads(plain, x, t)
    blocks = [m for m in ckpt.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    calls = _count_calls(blocks)
    out_c, grads_c = _grads(ckpt, x, t)
    torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
    assert grads_c.keys() == grads_p.keys()
    assert len(grads_p) == len(list(plain.parameters()))
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert calls == [2] * len(blocks)  # forward, then once more in backward


def test_patchddm_validates_its_input():
    net = _small_patchddm(False)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 2, 6, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        net(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="norm_num_groups"):
        PatchDDMUNet(channels=10)


@pytest.mark.parametrize("batch", [1, 2])
def test_checkpointed_monai_gives_plain_gradients_and_recomputes(batch):
    torch.manual_seed(0)
    plain = monai_unet((32, 32, 32)).double()
    _nonzero_output_layers(plain)
    ckpt = monai_unet((32, 32, 32), checkpointed=True).double()
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 1, 16, 16, 16, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,))
    out_p, grads_p = _grads(plain, x, t)
    blocks = [*ckpt.down_blocks, ckpt.middle_block, *ckpt.up_blocks]
    # The block's own hooks fire once (its call is outside the checkpoint); its layers run twice.
    calls = _count_calls([_first_norm(b) for b in blocks])
    out_c, grads_c = _grads(ckpt, x, t)
    torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
    assert grads_c.keys() == grads_p.keys()
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert calls == [2] * len(blocks)
    with torch.no_grad():  # inference does not recompute
        calls[:] = [0] * len(blocks)
        ckpt(x, t)
    assert calls == [1] * len(blocks)


def test_checkpoint_blocks_survives_deepcopy_and_rejects_unknown_blocks():
    net = copy.deepcopy(monai_unet((32, 32), checkpointed=True))
    calls = _count_calls([_first_norm(net.middle_block)])
    out = net(torch.randn(1, 1, 8, 8, 8), torch.zeros(1, dtype=torch.long))
    out.sum().backward()
    assert calls == [2]
    with pytest.raises(ValueError, match="no module 'nope'"):
        checkpoint_blocks(net, ("nope",))


def test_monai_recipe_is_defined_once():
    kw = monai_kwargs((32, 64, 64, 64))
    assert kw["attention_levels"] == (False, False, False, True)
    assert kw["num_res_blocks"] == 2
    assert kw["in_channels"] == 1
    assert kw["use_flash_attention"]


def test_bench_nets_by_name():
    assert parse_nets("idm,monai-ckpt,patchddm-ckpt") == ["idm", "monai-ckpt", "patchddm-ckpt"]
    with pytest.raises(ConfigError, match="--nets"):
        parse_nets("idm,unet")
    assert in_channels("patchddm") == 8
    assert in_channels("idm") == 1
    assert in_channels("conv-stack") == 32
    assert set(NET_LABELS) >= {"monai-ckpt", "patchddm", "patchddm-ckpt", "conv-stack"}
    assert build_net("idm").memory_efficient
    assert not build_net("idm-plain").memory_efficient
    stack = ConvStack()
    assert sum(isinstance(m, nn.Conv3d) for m in stack.modules()) == 8
