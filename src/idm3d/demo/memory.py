"""Training-step memory of the demo's two denoisers, each measured in a fresh process.

The measurement is the one ``idm3d bench memory`` makes (:func:`idm3d.bench.harness.measure_training_step`
inside :func:`idm3d.bench.harness.run_config`), applied to the networks and the patch size the demo
actually trains, through the run's :class:`~idm3d.diffusion.pipeline.DiffusionPipeline` (noising, concat
conditioning, the loss): the peak memory growth of one training step (forward, loss, backward) over what the
process held once model and inputs existed, the parameter count, and the median step time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from idm3d.bench.harness import measure_training_step, run_config
from idm3d.runs.config import Config, ModelConfig, config_from_dict, config_to_dict
from idm3d.runs.load import build_pipeline
from idm3d.runs.model_factory import build_model, model_channels

__all__ = ["child", "measure_nets"]


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Build one denoiser and measure one training step (the pipeline's loss) on a random batch (fresh process)."""
    device = torch.device(config["device"])
    cfg = config_from_dict(config["run"])
    torch.manual_seed(0)
    in_ch, out_ch = model_channels(cfg.data)
    net = build_model(ModelConfig(config["name"], dict(config["kwargs"])), in_ch, out_ch).to(device)
    pipeline = build_pipeline(cfg, net, device)
    batch, patch = cfg.data.batch_size, cfg.data.patch_size
    inputs = {
        "target": torch.randn(batch, out_ch, *patch, device=device),
        "noise": torch.randn(batch, out_ch, *patch, device=device),
        "source": torch.randn(batch, in_ch - out_ch, *patch, device=device) if in_ch > out_ch else None,
        "timesteps": torch.randint(0, cfg.diffusion.num_train_timesteps, (batch,), device=device),
    }

    def step() -> None:
        pipeline.loss(inputs).backward()

    result = measure_training_step(net, step, device, warmup=config.get("warmup", 1),
                                   repeats=config.get("repeats", 3), count_flops=False)
    result["parameters"] = sum(p.numel() for p in net.parameters())
    return result


def measure_nets(
    models: Sequence[tuple[str, ModelConfig]],
    cfg: Config,
    device: torch.device | str,
    *,
    repeats: int = 3,
    timeout_s: float = 600.0,
) -> dict[str, dict[str, Any]]:
    """Measure each ``(label, model config)`` at ``cfg``'s patch and batch size; one fresh process each.

    Returns:
        label -> the :func:`child` result (``parameters``, ``peak_growth_mib``, ``step_s``, ``memory_method``,
        ...) plus ``status`` (``ok``, ``oom``, ``error`` or ``timeout``) and, on failure, ``error``.
    """
    out: dict[str, dict[str, Any]] = {}
    for label, model_cfg in models:
        config = {
            "name": model_cfg.name,
            "kwargs": dict(model_cfg.kwargs),
            "run": config_to_dict(cfg),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
        }
        out[label] = run_config("idm3d.demo.memory:child", config, timeout_s=timeout_s)
    return out
