"""Rectified flow: MONAI's sign convention, the solvers' call counts and orders, inversion, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from idm3d.diffusion.flow import flow_epsilon, flow_x0, prediction_kind
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.diffusion.schedule import sample_timesteps, training_target
from idm3d.errors import ArgumentError, ConfigError
from idm3d.runs.config import load_config
from idm3d.runs.load import build_scheduler


def _cfg(*extra: str):
    return load_config(None, ["diffusion.kind=rflow", "diffusion.clip_sample=false", *extra])


def test_flow_config_resolves_its_prediction_type_and_sampler_and_old_runs_stay_ddpm():
    cfg = _cfg()
    assert (cfg.diffusion.prediction_type, cfg.sample.sampler) == ("flow", "euler")
    old = load_config(None, [])
    assert (old.diffusion.kind, old.diffusion.prediction_type, old.sample.sampler) == ("ddpm", "epsilon", "ddim")


@pytest.mark.parametrize(("overrides", "message"), [
    (["diffusion.kind=rflow", "diffusion.prediction_type=epsilon"], r"^diffusion\.prediction_type: diffusion\.kind "),
    (["diffusion.prediction_type=flow"], r"^diffusion\.prediction_type: diffusion\.kind ddpm predicts"),
    (["diffusion.kind=rflow", "sample.sampler=ddim"], r"^sample\.sampler: a diffusion\.kind rflow run samples "),
    (["sample.sampler=heun"], r"^sample\.sampler: a diffusion\.kind ddpm run samples with ddpm\|ddim"),
])
def test_the_other_objectives_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_monai_sign_convention_and_estimates():
    sched = build_scheduler(_cfg())
    x0, noise = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    t = torch.tensor([250, 900])
    x_t = sched.add_noise(x0, noise, t)
    s = (t.float() / 1000).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise, atol=1e-6)
    v = training_target(sched, x0, noise, t)
    assert torch.allclose(v, x0 - noise)  # MAISI's model_gt = images - noise
    assert torch.allclose(flow_x0(sched, x_t, v, t), x0, atol=1e-5)
    assert torch.allclose(flow_epsilon(sched, x_t, v, t), noise, atol=1e-5)
    assert prediction_kind(sched) == "flow"
    assert sched.prediction_type == "v_prediction"


def test_training_timesteps_are_reproducible_and_leave_the_global_rng_alone():
    sched = build_scheduler(_cfg("diffusion.sample_method=logit-normal"))
    state = torch.random.get_rng_state()
    a = sample_timesteps(sched, 8, torch.Generator().manual_seed(3), (16, 16, 16))
    b = sample_timesteps(sched, 8, torch.Generator().manual_seed(3), (16, 16, 16))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.dtype == torch.long
    assert bool(((a >= 0) & (a < 1000)).all())


@pytest.mark.parametrize(("solver", "calls", "steps"), [("euler", 5, 5), ("heun", 1, 1), ("heun", 2, 1),
                                                        ("heun", 3, 2), ("heun", 8, 4)])
def test_calls_are_network_calls_whatever_the_solver(solver, calls, steps):
    sched = build_scheduler(_cfg(), solver, calls)
    made = []
    pipe = DiffusionPipeline(lambda x, t: made.append(t) or -0.5 * x, build_scheduler(_cfg()))
    pipe.sample((1, 1, 4, 4, 4), scheduler=sched, generator=torch.Generator().manual_seed(0))
    assert len(made) == calls
    assert sched.steps == steps
    made.clear()
    pipe.invert(torch.randn(1, 1, 4, 4, 4), scheduler=sched)
    assert len(made) == calls


def test_heun_is_second_order_and_inversion_round_trips():
    """On dx/ds = 0.5 x (v = -0.5 x) the exact flow from noise to data scales by exp(-0.5)."""
    pipe = DiffusionPipeline(lambda x, t: -0.5 * x, build_scheduler(_cfg()))
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = {}
    for solver in ("euler", "heun"):
        for calls in (4, 8):
            sched = build_scheduler(_cfg(), solver, calls)
            out = pipe.sample(x.shape, scheduler=sched, noise=x)
            errors[solver, calls] = float((out - x * math.exp(-0.5)).abs().max())
            back = pipe.invert(out, scheduler=sched)
            assert float((back - x).abs().max()) < (0.1 if solver == "euler" else 0.005) * float(x.abs().max())
    assert errors["euler", 4] / errors["euler", 8] == pytest.approx(2, rel=0.2)  # first order
    assert errors["heun", 4] / errors["heun", 8] == pytest.approx(4, rel=0.2)  # second order


def test_flow_solvers_and_ddpm_samplers_do_not_mix():
    with pytest.raises(ConfigError, match=r"^sample\.sampler: expected euler\|heun, got 'ddim'"):
        build_scheduler(_cfg(), "ddim", 4)
    with pytest.raises(ConfigError, match=r"^sample\.sampler: expected ddpm\|ddim, got 'heun'"):
        build_scheduler(load_config(None, []), "heun", 4)
    ddpm_pipe = DiffusionPipeline(lambda x, t: x, build_scheduler(load_config(None, [])))
    with pytest.raises(ArgumentError, match="'flow'"):
        ddpm_pipe.sample((1, 1, 4, 4, 4), scheduler=build_scheduler(_cfg(), "euler", 2))


def test_timestep_warp_spends_more_time_near_noise_for_larger_volumes():
    cfg = _cfg("diffusion.use_timestep_transform=true", "diffusion.base_img_size_numel=512")
    sched = build_scheduler(cfg, "euler", 4)
    small, large = sched.grid((8, 8, 8)), sched.grid((32, 32, 32))
    assert small == [1000.0, 750.0, 500.0, 250.0, 0.0]
    assert large[0] == 1000
    assert large[-1] == 0
    assert all(b > a for a, b in zip(small[1:-1], large[1:-1]))
