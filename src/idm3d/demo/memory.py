"""Training-step memory of the demo's two denoisers, each measured in a fresh process.

The measurement is the one ``idm3d bench memory`` makes (:func:`idm3d.bench.harness.measure_training_step`
inside :func:`idm3d.bench.harness.run_config`), applied to the networks and the patch size the demo
actually trains: the peak memory growth of one training step (forward, loss, backward) over what the
process held once model and inputs existed, the parameter count, and the median step time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from idm3d.bench.harness import measure_training_step, run_config
from idm3d.diffusion.schedule import diffusion_loss
from idm3d.training.config import Config, ModelConfig
from idm3d.training.model_factory import build_model, model_channels

__all__ = ["child", "measure_nets"]


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Build one denoiser and measure one training step on a random batch (runs in a fresh process)."""
    device = torch.device(config["device"])
    torch.manual_seed(0)
    net = build_model(ModelConfig(config["name"], dict(config["kwargs"])), config["in_channels"],
                      config["out_channels"]).to(device)
    batch, patch = int(config["batch"]), [int(s) for s in config["patch_size"]]
    x = torch.randn(batch, config["in_channels"], *patch, device=device)
    target = torch.randn(batch, config["out_channels"], *patch, device=device)
    timesteps = torch.randint(0, int(config["num_train_timesteps"]), (batch,), device=device)

    def step() -> None:
        diffusion_loss(net(x, timesteps), target, config.get("loss", "mse")).backward()

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
    in_ch, out_ch = model_channels(cfg.data)
    out: dict[str, dict[str, Any]] = {}
    for label, model_cfg in models:
        config = {
            "name": model_cfg.name,
            "kwargs": dict(model_cfg.kwargs),
            "in_channels": in_ch,
            "out_channels": out_ch,
            "batch": cfg.data.batch_size,
            "patch_size": list(cfg.data.patch_size),
            "num_train_timesteps": cfg.diffusion.num_train_timesteps,
            "loss": cfg.diffusion.loss,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
        }
        out[label] = run_config("idm3d.demo.memory:child", config, timeout_s=timeout_s)
    return out
