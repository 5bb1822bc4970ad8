"""Checkpoints: atomic commit, hash verification, architecture checks, no NaN weights, EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from idm3d.errors import CheckpointError, NonFiniteError
from idm3d.runs.checkpoint import (
    checkpoint_paths,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_state_strict,
    optimizer_from_flat,
    optimizer_to_flat,
    remove_stale_files,
    save_checkpoint,
)
from idm3d.runs.config import ModelConfig
from idm3d.runs.model_factory import architecture_signature, build_model
from idm3d.training.ema import EMA


def _net(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.GroupNorm(2, width), nn.Conv3d(width, 1, 1))


def _save(folder: Path, step: int, net: nn.Module, keep: int | None = None) -> Path:
    tensors = {f"model/{k}": v for k, v in net.state_dict().items()}
    return save_checkpoint(folder, step, tensors, {"signature": architecture_signature(net)}, keep=keep)


def test_round_trip_and_keep_last_k(tmp_path: Path):
    net = _net()
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, net, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000030.json", "step-00000030.safetensors", "step-00000040.json", "step-00000040.safetensors"]
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path), architecture_signature(net))
    assert state["step"] == 40
    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_state_strict(other, tensors, "model/", "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def test_partial_temp_files_and_orphan_weights_are_ignored_and_cleaned(tmp_path: Path):
    net = _net()
    _save(tmp_path, 5, net)
    # A crash while writing step 10: a torn temp file, and a committed weights file without its JSON.
    (tmp_path / ".step-00000010.safetensors.tmp-123").write_bytes(b"\x00" * 17)
    weights10, _ = checkpoint_paths(tmp_path, 10)
    weights10.write_bytes(checkpoint_paths(tmp_path, 5)[0].read_bytes())
    (tmp_path / ".step-00000010.json.tmp-123").write_text('{"format": "idm3d-chec')
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert latest_checkpoint(tmp_path).name == "step-00000005.json"
    removed = remove_stale_files(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005.json", "step-00000005.safetensors"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "replace_other_weights", "delete_weights"])
def test_tampered_or_damaged_weights_raise_checkpoint_error(tmp_path: Path, damage: str):
    net = _net()
    meta = _save(tmp_path, 1, net)
    weights = meta.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    if damage == "flip_byte":
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "replace_other_weights":
        other = _net()
        with torch.no_grad():
            next(other.parameters()).add_(1)
        _save(tmp_path / "o", 1, other)
        weights.write_bytes((tmp_path / "o" / weights.name).read_bytes())
    else:
        weights.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(meta)
    assert weights.name in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "something-else"}'])
def test_bad_state_json_raises_checkpoint_error(tmp_path: Path, content: str):
    meta = _save(tmp_path, 1, _net())
    meta.write_text(content)
    with pytest.raises(CheckpointError, match=str(meta.name)):
        load_checkpoint(meta)


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path):
    meta = _save(tmp_path, 1, _net(width=4))
    wider = _net(width=6)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(meta, architecture_signature(wider))
    tensors, _ = load_checkpoint(meta)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_strict(wider, tensors, "model/", meta)
    deeper = nn.Sequential(*_net(width=4), nn.Conv3d(1, 1, 1))
    with pytest.raises(CheckpointError, match="missing 2 keys"):
        load_state_strict(deeper, tensors, "model/", meta)


def test_factory_models_of_different_kinds_have_different_signatures():
    idm = build_model(ModelConfig("idm", {"channels": 8, "levels": 2, "blocks_per_level": 1,
                                          "attention_levels": [False, False]}), 1, 1)
    idm2 = build_model(ModelConfig("idm", {"channels": 8, "levels": 2, "blocks_per_level": 1,
                                           "attention_levels": [False, False]}), 2, 1)
    monai = build_model(ModelConfig("monai", {"channels": [8, 8], "num_res_blocks": 1,
                                              "attention_levels": [False, False], "norm_num_groups": 4}), 1, 1)
    digests = {architecture_signature(m)["digest"] for m in (idm, idm2, monai)}
    assert len(digests) == 3


def test_nan_weights_are_never_saved(tmp_path: Path):
    net = _net()
    _save(tmp_path, 1, net)
    with torch.no_grad():
        next(net.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"model/0\.weight"):
        _save(tmp_path, 2, net)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.json", "step-00000001.safetensors"]


def test_state_json_records_hash_and_is_strict_json(tmp_path: Path):
    meta = _save(tmp_path, 3, _net())
    state = json.loads(meta.read_text())
    assert state["format"] == "idm3d-checkpoint-v1"
    assert len(state["weights_sha256"]) == 64
    assert state["weights_file"] == "step-00000003.safetensors"


def test_optimizer_state_round_trip():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(1, 1, 4, 4, 4)).square().mean().backward()
        opt.step()
    tensors, meta = optimizer_to_flat(opt)
    meta = json.loads(json.dumps(meta))
    net2 = _net()
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    optimizer_from_flat(opt2, {k: v.clone() for k, v in tensors.items()}, meta)
    x = torch.randn(1, 1, 4, 4, 4)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def test_ema_tracks_weights_with_warmup():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # decay min(0.9, 1/10) = 0.1 -> 0.9 of the new weights
    assert float(ema.shadow["weight"][0, 0]) == pytest.approx(0.9)
    for _ in range(200):
        ema.update(net)
    assert float(ema.shadow["weight"][0, 0]) == pytest.approx(1.0, abs=1e-6)
    target = nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.ones(1, 2))
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.5)
