"""The config's rules across options (a translation needs sources, beta_end > beta_start, ...).

Checked by ``Config.__post_init__`` after each value passed its own type and range check
(``runs.config_convert``), so each rule names the first key it is about.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from idm3d.errors import ConfigError

if TYPE_CHECKING:
    from idm3d.runs.config import Config

__all__ = ["check_consistency"]


def check_consistency(cfg: Config) -> None:
    """Raise a one-line ``ConfigError`` naming the key when two options contradict each other."""
    d, t = cfg.data, cfg.train
    if len(d.patch_size) != 3:
        raise ConfigError(f"data.patch_size: expected 3 integers (D, H, W), got {d.patch_size}")
    if not d.targets:
        raise ConfigError("data.targets: expected at least one modality, got []")
    if d.task == "translate" and not d.sources:
        raise ConfigError("data.sources: task 'translate' needs at least one source modality, got []")
    if d.task == "generate" and d.sources:
        raise ConfigError(f"data.sources: task 'generate' takes no source modalities, got {d.sources}")
    overlap = sorted(set(d.sources) & set(d.targets))
    if overlap:
        raise ConfigError(f"data.sources: {overlap} also listed in data.targets")
    if d.root is None and not set(d.sources + d.targets) <= {"t1", "t2"}:
        raise ConfigError(
            f"data.targets: the demo data (data.root null) has modalities t1 and t2, got {d.sources + d.targets}"
        )
    if d.root is not None and d.demo_split != "below":
        raise ConfigError(f"data.demo_split: only for the demo data (data.root null), got {d.demo_split!r} with "
                          f"data.root {d.root!r}")
    if isinstance(d.patch.schedule, list) and (
        not d.patch.schedule or abs(sum(s.share for s in d.patch.schedule) - 1.0) > 1e-6
    ):
        shares = [s.share for s in d.patch.schedule]
        raise ConfigError(f"data.patch.schedule: expected fixed|mixed or {{scale, share}} entries whose shares "
                          f"sum to 1, got shares {shares}")
    if d.spacing is not None and len(d.spacing) not in (1, 3):
        raise ConfigError(f"data.spacing: expected 1 or 3 sizes in mm, or null, got {d.spacing}")
    if d.spatial_size is not None and len(d.spatial_size) != 3:
        raise ConfigError(f"data.spatial_size: expected 3 integers or null, got {d.spatial_size}")
    if len(d.percentiles) != 2 or not d.percentiles[0] < d.percentiles[1]:
        raise ConfigError(f"data.percentiles: expected [lower, upper] with lower < upper, got {d.percentiles}")
    if len(d.window) != 2 or not d.window[0] < d.window[1]:
        raise ConfigError(f"data.window: expected [lower, upper] HU with lower < upper, got {d.window}")
    if d.foreground == "body" and d.intensity != "ct":
        raise ConfigError("data.foreground: body thresholds Hounsfield units; it needs data.intensity ct, got "
                          f"{d.intensity!r}")
    if d.root is None and d.intensity != "percentile":
        raise ConfigError(f"data.intensity: the demo data (data.root null) is MRI; {d.intensity!r} needs data.root")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError(
            f"data.test_fraction: val_fraction + test_fraction must be < 1, got {d.val_fraction + d.test_fraction}"
        )
    if t.max_steps is None and t.max_seconds is None and t.max_cpu_seconds is None:
        raise ConfigError("train.max_steps: set train.max_steps, train.max_seconds and/or train.max_cpu_seconds "
                          "(all are null)")
    _check_objective(cfg)
    if cfg.diffusion.beta_end <= cfg.diffusion.beta_start:
        raise ConfigError(
            f"diffusion.beta_end: expected > beta_start ({cfg.diffusion.beta_start}), got {cfg.diffusion.beta_end}"
        )
    if cfg.sample.steps > cfg.diffusion.num_train_timesteps:
        raise ConfigError(
            f"sample.steps: expected <= diffusion.num_train_timesteps ({cfg.diffusion.num_train_timesteps}), "
            f"got {cfg.sample.steps}"
        )
    if cfg.sample.roi_size is not None and len(cfg.sample.roi_size) != 3:
        raise ConfigError(f"sample.roi_size: expected 3 integers (D, H, W) or null, got {cfg.sample.roi_size}")
    from idm3d.runs.model_kwargs import check_model_kwargs  # lazy: reads the network's signature

    check_model_kwargs(cfg.model.name, cfg.model.kwargs)


def _check_objective(cfg: Config) -> None:
    """One line when the prediction type or the sampler belongs to the other objective (ddpm vs rflow)."""
    d, flow = cfg.diffusion, cfg.diffusion.kind == "rflow"
    if d.prediction_type not in (("flow", "sample") if flow else ("epsilon", "sample", "v_prediction")):
        want = "flow|sample" if flow else "epsilon|sample|v_prediction"
        raise ConfigError(f"diffusion.prediction_type: diffusion.kind {d.kind} predicts {want}, got "
                          f"{d.prediction_type!r}")
    if (cfg.sample.sampler in ("euler", "heun")) != flow:
        want = "euler|heun" if flow else "ddpm|ddim"
        raise ConfigError(f"sample.sampler: a diffusion.kind {d.kind} run samples with {want}, got "
                          f"{cfg.sample.sampler!r}")
