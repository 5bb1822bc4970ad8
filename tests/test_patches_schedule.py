"""Patch-size schedules: sizes from scales, the share of each size over steps, one size per batch, and the
``data.patch`` config section (defaults, old configs, errors naming the key)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from idm3d.data.patch_schedule import PATCH_DIFFUSION_MIX, PatchSchedule, scaled_sizes
from idm3d.data.patches import PatchSampler, generator_for_step
from idm3d.errors import ConfigError
from idm3d.runs.config import PatchConfig, config_from_dict, config_to_dict, load_config
from idm3d.runs.data_source import patch_schedule


def test_scaled_sizes_round_down_to_the_network_multiple():
    assert scaled_sizes((80, 96, 16), [1.0, 0.5, 0.25], multiple=4) == [(80, 96, 16), (40, 48, 8), (20, 24, 4)]
    assert scaled_sizes((30, 30, 30), [0.5, 0.1], multiple=8) == [(8, 8, 8), (8, 8, 8)]
    with pytest.raises(ValueError, match=r"^schedule: a patch scale"):
        scaled_sizes((8, 8, 8), [1.5])


def test_patch_diffusion_mix_is_half_full_size_then_three_fifths_half_and_two_fifths_quarter():
    assert dict(PATCH_DIFFUSION_MIX) == {1.0: 0.5, 0.5: pytest.approx(0.3), 0.25: pytest.approx(0.2)}
    assert sum(share for _, share in PATCH_DIFFUSION_MIX) == pytest.approx(1.0)


@pytest.mark.parametrize("shares", [(0.5, 0.3, 0.2), (0.1, 0.1, 0.8)])
def test_each_size_is_drawn_on_its_share_of_the_steps(shares):
    sizes = [(8, 8, 8), (4, 4, 4), (4, 4, 2)]
    schedule = PatchSchedule(sizes, shares)
    n = 4000
    counts = Counter(schedule.draw(generator_for_step(3, s)) for s in range(n))
    for size, share in zip(sizes, shares):
        # binomial standard deviation <= 0.008 at n = 4000: 4 sigma
        assert abs(counts[size] / n - share) < 0.032, (size, counts)


def test_every_batch_is_of_one_size_and_the_sequence_is_reproducible():
    volumes = [torch.randn(2, 16, 16, 12), torch.randn(2, 12, 14, 10)]
    schedule = PatchSchedule(scaled_sizes((8, 8, 8), [1.0, 0.5, 0.25], 2), [0.5, 0.3, 0.2])
    sampler = PatchSampler(volumes, None, (8, 8, 8), batch_size=4, seed=1, target_channels=[1], schedule=schedule)
    seen = Counter()
    for step in range(60):
        b = sampler.batch(step)
        size = tuple(b["target"].shape[2:])
        assert size in schedule.sizes
        assert b["source"].shape[2:] == b["mask"].shape[2:] == size
        seen[size] += 1
        again = sampler.batch(step)
        assert torch.equal(again["target"], b["target"])
        assert torch.equal(again["position"], b["position"])
    assert set(seen) == set(schedule.sizes)


def test_a_fixed_schedule_draws_exactly_the_patches_of_a_plain_sampler():
    volume = torch.randn(2, 16, 16, 12)
    kwargs = {"batch_size": 2, "seed": 4, "target_channels": [1]}
    plain = PatchSampler([volume], None, (8, 8, 4), **kwargs)
    fixed = PatchSampler([volume], None, (8, 8, 4), schedule=PatchSchedule.fixed((8, 8, 4)), **kwargs)
    for step in range(5):
        assert torch.equal(plain.batch(step)["corner"], fixed.batch(step)["corner"])


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match=r"^schedule: the shares must be > 0 and sum to 1"):
        PatchSchedule([(4, 4, 4), (8, 8, 8)], [0.5, 0.6])
    with pytest.raises(ValueError, match=r"^schedule: expected one share per patch size"):
        PatchSchedule([(4, 4, 4)], [0.5, 0.5])


def test_config_defaults_and_an_old_config_without_the_section():
    cfg = load_config(None)
    assert cfg.data.patch == PatchConfig(coordinates=False, schedule="fixed")
    old = config_to_dict(cfg)
    del old["data"]["patch"]
    assert config_from_dict(old).data.patch == PatchConfig()


def test_mixed_and_explicit_schedules_load_and_round_trip():
    mixed = load_config(None, ["data.patch.schedule=mixed", "data.patch.coordinates=true"])
    assert mixed.data.patch.schedule == "mixed"
    assert mixed.data.patch.coordinates
    cfg = load_config(None, ["data.patch.schedule=[{scale: 1.0, share: 0.75}, {scale: 0.5, share: 0.25}]"])
    assert [(s.scale, s.share) for s in cfg.data.patch.schedule] == [(1.0, 0.75), (0.5, 0.25)]
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.patch.schedule=random", r"^data\.patch\.schedule: expected one of fixed\|mixed"),
        ("data.patch.schedule=[{scale: 1.0, share: 0.5}]", r"^data\.patch\.schedule: .*sum to 1"),
        ("data.patch.schedule=[{scale: 2.0, share: 1.0}]", r"^data\.patch\.schedule\[0\]\.scale: expected a number"),
        ("data.patch.schedule=[{size: 2, share: 1.0}]", r"^data\.patch\.schedule\[0\]\.size: unknown option"),
        ("data.patch.coordinates=3", r"^data\.patch\.coordinates: expected true/false"),
        ("data.patch.sizes=[1]", r"^data\.patch\.sizes: unknown option"),
    ],
)
def test_bad_patch_options_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_the_run_schedule_scales_data_patch_size_by_the_model_multiple():
    cfg = load_config("configs/demo.yaml", ["data.patch_size=[80,96,16]", "data.patch.schedule=mixed"])
    schedule = patch_schedule(cfg)
    assert schedule.sizes == [(80, 96, 16), (40, 48, 8), (20, 24, 4)]
    assert schedule.shares == pytest.approx([0.5, 0.3, 0.2])
    fixed = patch_schedule(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, patch=PatchConfig())))
    assert fixed.sizes == [(80, 96, 16)]


def test_scaled_sizes_keep_a_smallest_edge_without_exceeding_the_patch():
    assert scaled_sizes((8, 8, 3), [0.25], multiple=2, smallest=4) == [(4, 4, 3)]
    cfg = load_config(None, ["data.patch_size=[16,16,8]", "data.patch.schedule=mixed",
                             "model.kwargs={levels: 2, channels: 8}"])
    assert patch_schedule(cfg).sizes[-1] == (4, 4, 4)
