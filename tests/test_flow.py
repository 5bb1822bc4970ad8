"""Rectified flow: MONAI's sign convention, the solvers' call counts and orders, inversion, config checks."""

from __future__ import annotations

import itertools

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


SIGMA = 0.5


def _a(t: float) -> float:
    """The exact velocity of rectified flow on data N(0, SIGMA^2) is ``v(x, t) = a(t) x`` with, for s = t / T,
    ``a = ((1 - s) SIGMA^2 - s) / ((1 - s)^2 SIGMA^2 + s^2)``: noise n flows to exactly ``SIGMA * n``."""
    s = t / 1000
    return ((1 - s) * SIGMA**2 - s) / ((1 - s) ** 2 * SIGMA**2 + s**2)


def _gaussian_flow(times: list[float]):
    def v(x, t):
        times.append(float(t[0]))
        return _a(float(t[0])) * x

    return v


def _scheme_gain(grid: list[float], kinds: list[str]) -> float:
    """What Euler (``x + h a(t) x``) and Heun (``x + h/2 (a(t) x + a(t') (x + h a(t) x))``) steps multiply by."""
    gain = 1.0
    for (t, t_next), kind in zip(itertools.pairwise(grid), kinds):
        h, a, a_next = (t - t_next) / 1000, _a(t), _a(t_next)
        gain *= 1 + h * a if kind == "E" else 1 + h / 2 * (a + a_next + h * a * a_next)
    return gain


@pytest.mark.parametrize("calls", range(1, 9))
def test_heun_spends_its_n_calls_on_steps_that_end_with_an_euler_step(calls):
    """N calls: floor(N/2) + 1 steps, Euler last (and first for even N), no call at t = 0 in either direction;
    the sample is what those steps give on a linear field."""
    sched = build_scheduler(_cfg(), "heun", calls)
    times = []
    pipe = DiffusionPipeline(_gaussian_flow(times), build_scheduler(_cfg()))
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # the pipeline samples in fp32
    out = pipe.sample(x.shape, scheduler=sched, noise=x)
    steps = calls // 2 + 1
    kinds = ["E" if i == steps - 1 or (calls % 2 == 0 and i == 0) else "H" for i in range(steps)]
    assert len(times) == calls
    assert sched.steps == steps
    assert min(times) > 0
    assert torch.allclose(out, x * _scheme_gain(sched.grid(x.shape[2:]), kinds), rtol=1e-5, atol=1e-6)
    times.clear()
    pipe.invert(out, scheduler=sched)
    assert len(times) == calls
    assert min(times) > 0


def test_heun_is_second_order_euler_first_and_inversion_round_trips():
    """Against the exact solution SIGMA * noise; 9 and 17 calls are 5 and 9 Heun-schedule steps (4 and 8 Heun
    steps + a last Euler step), so a second-order error falls by (9/5)^2; Euler's by 17/9."""
    pipe = DiffusionPipeline(_gaussian_flow([]), build_scheduler(_cfg()))
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    errors, trips = {}, {}
    for solver in ("euler", "heun"):
        for calls in (9, 17):
            sched = build_scheduler(_cfg(), solver, calls)
            out = pipe.sample(x.shape, scheduler=sched, noise=x)
            errors[solver, calls] = float((out - SIGMA * x).abs().max())
            trips[solver, calls] = float((pipe.invert(out, scheduler=sched) - x).abs().max())
    assert errors["euler", 9] / errors["euler", 17] == pytest.approx(17 / 9, rel=0.1)
    assert errors["heun", 9] / errors["heun", 17] == pytest.approx((9 / 5) ** 2, rel=0.15)
    for calls in (9, 17):
        assert errors["heun", calls] < 0.6 * errors["euler", calls]
        assert trips["heun", calls] < 0.2 * trips["euler", calls]
    assert trips["euler", 17] < 0.6 * trips["euler", 9]


def test_x0_parametrised_flow_learns_x0_and_its_solvers_land_on_the_prediction():
    """diffusion.prediction_type: sample on a flow run: the target is x0 and the velocity (x0_hat - x_t) / s, so a
    network that always answers one volume is sampled to exactly that volume, by every solver and call count."""
    cfg = _cfg("diffusion.prediction_type=sample")
    sched = build_scheduler(cfg)
    x0, noise, t = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4), torch.tensor([250, 900])
    assert torch.equal(training_target(sched, x0, noise, t), x0)
    assert torch.equal(flow_x0(sched, sched.add_noise(x0, noise, t), x0, t), x0)
    assert torch.allclose(flow_epsilon(sched, sched.add_noise(x0, noise, t), x0, t), noise, atol=1e-5)
    answer = torch.randn(1, 1, 4, 4, 4)
    pipe = DiffusionPipeline(lambda x, t: answer.expand_as(x), sched)
    for solver in ("euler", "heun"):
        for calls in (1, 2, 3, 4):
            out = pipe.sample(answer.shape, scheduler=build_scheduler(cfg, solver, calls),
                              generator=torch.Generator().manual_seed(calls))
            assert torch.allclose(out, answer, atol=1e-5)
    assert _cfg().diffusion.prediction_type == "flow"  # the velocity stays the default


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
