"""The training objectives the studies compare, written out in full as overrides of ``configs/demo.yaml``.

The studies pin what they ran, so their commands reproduce their figures whatever the demo's defaults
become: :data:`DDPM_DEMO` is the demo's DDPM objective sampled with 10 DDIM calls (the default until
2026-12-06, when the demo went to 4 calls: docs/sampling.md), :data:`FLOW` MONAI's rectified flow.
"""

from __future__ import annotations

# DDPM, x0 prediction, 100 timesteps (t = 99 is pure noise), DDIM with 10 calls.
DDPM_DEMO = ["diffusion.kind=ddpm", "diffusion.num_train_timesteps=100", "diffusion.schedule=linear_beta",
             "diffusion.beta_start=0.001", "diffusion.beta_end=0.2", "diffusion.prediction_type=sample",
             "diffusion.use_timestep_transform=false", "diffusion.base_img_size_numel=32768",
             "sample.sampler=ddim", "sample.steps=10", "sample.eta=0.0"]
# Rectified flow with MONAI's defaults (the network predicts the velocity, uniform timesteps, no warp) and
# MAISI's 1000 train timesteps; every other setting the demo's. 10 calls: what its runs were sampled and
# inverted with by default (idm3d detect) when they were trained.
FLOW = ["diffusion.kind=rflow", "diffusion.prediction_type=flow", "diffusion.num_train_timesteps=1000",
        "diffusion.use_timestep_transform=false", "diffusion.base_img_size_numel=32768",
        "sample.sampler=euler", "sample.steps=10"]
