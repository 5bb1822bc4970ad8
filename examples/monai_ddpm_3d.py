"""MONAI's 3D DDPM tutorial loop with idm3d's invertible ``IDMUNet`` in place of ``DiffusionModelUNet``.

Everything except the network is MONAI's tutorial as written: ``DDPMScheduler`` (scaled linear betas),
``DiffusionInferer`` for the noisy input and the sampling loop, an MSE loss on the predicted noise, an
exponential moving average of the weights (``torch.optim.swa_utils.AveragedModel``), then sampling with
both the DDPM chain and a shorter DDIM chain from the averaged weights.

    python examples/monai_ddpm_3d.py --out runs/ddpm3d                      # synthetic volumes, 32^3
    python examples/monai_ddpm_3d.py --data-dir DIR --size 64 --out runs/x  # your NIfTI volumes
    python examples/monai_ddpm_3d.py --smoke --out runs/ddpm3d              # seconds on a CPU
    python examples/monai_ddpm_3d.py --objective rflow --out runs/flow3d    # rectified flow (MAISI's loop)

``--objective rflow`` swaps the objective for MONAI's ``RFlowScheduler`` as MAISI trains it
(``diff_model_train.py``): timesteps from ``sample_timesteps``, ``add_noise``, an L1 loss on the velocity
``images - noise``, then ``--flow-steps`` Euler steps of ``RFlowScheduler.step`` (``OUT/sample_euler.nii.gz``).

Writes ``OUT/ema.safetensors`` (the averaged IDMUNet weights; reload with ``IDMUNet(**model_kwargs)`` and
``safetensors.torch.load_file``), ``OUT/sample_ddpm.nii.gz``, ``OUT/sample_ddim.nii.gz`` and
``OUT/summary.json`` (model kwargs, losses, sample statistics). Data: see ``examples/volumes.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from volumes import (
    add_common_arguments,
    batches,
    check_finite,
    device_from,
    save_volume,
    training_volumes,
    write_summary,
)

from idm3d import IDMUNet

# MONAI tutorial's noise schedule; DDIM sampling reuses it, so the two chains sample the same model.
SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0005, "beta_end": 0.0195}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=2000, help="training steps (batches)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema-decay", type=float, default=0.995,
                        help="AveragedModel has no warm-up: the first weights keep a share of decay**steps of the "
                             "average, so keep --steps well above 1 / (1 - decay)")
    parser.add_argument("--channels", type=int, default=16, help="IDMUNet core width at full resolution")
    parser.add_argument("--levels", type=int, default=3, help="IDMUNet resolution levels (attention on the lowest)")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="DDPM sampling steps (the tutorial: 1000)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM sampling steps")
    parser.add_argument("--objective", choices=("ddpm", "rflow"), default="ddpm",
                        help="ddpm (the tutorial) or rflow (rectified flow, MONAI's RFlowScheduler)")
    parser.add_argument("--flow-steps", type=int, default=30, help="Euler steps of an rflow run (MAISI: 30)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (the invertible core's state stays fp32)")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.num_volumes, args.batch_size, args.steps = 16, 2, 2, 2
        args.channels, args.levels, args.ddpm_steps, args.ddim_steps, args.log_every = 8, 2, 2, 2, 1
        args.flow_steps = 2
    return args


def model_kwargs(args: argparse.Namespace) -> dict:
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": args.channels, "levels": args.levels,
            "attention_levels": [False] * (args.levels - 1) + [True], "num_heads": 1}


def flow_scheduler() -> RFlowScheduler:
    """MAISI's rectified-flow settings (uniform timesteps; no resolution warp at these small sizes)."""
    return RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True, sample_method="uniform")


def flow_loss(model: IDMUNet, scheduler: RFlowScheduler, images: torch.Tensor) -> torch.Tensor:
    """MAISI's loss: the network's velocity at ``add_noise(images, noise, t)`` against ``images - noise``."""
    noise = torch.randn_like(images)
    timesteps = scheduler.sample_timesteps(images)
    velocity = model(scheduler.add_noise(images, noise, timesteps), timesteps)
    return F.l1_loss(velocity.float(), (images - noise).float())


def train(args: argparse.Namespace, model: IDMUNet, ema: AveragedModel, volumes: list[torch.Tensor],
          device: torch.device) -> list[float]:
    flow = flow_scheduler() if args.objective == "rflow" else None
    scheduler = DDPMScheduler(**SCHEDULE)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = batches(volumes, args.batch_size, args.seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        images = next(data).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            if flow is not None:
                loss = flow_loss(model, flow, images)
            else:
                noise = torch.randn_like(images)
                timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],), device=device).long()
                noise_pred = inferer(inputs=images, diffusion_model=model, noise=noise, timesteps=timesteps)
                loss = F.mse_loss(noise_pred.float(), noise.float())
        losses.append(check_finite(loss, step, "training"))
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.1f} s", flush=True)
    return losses


@torch.no_grad()
def sample(args: argparse.Namespace, model: IDMUNet, device: torch.device) -> dict[str, torch.Tensor]:
    """One volume from each chain, from the same starting noise."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn((1, 1, args.size, args.size, args.size), generator=gen, device=device)
    if args.objective == "rflow":
        return {"euler": sample_flow(args, model, noise)}
    ddpm = DDPMScheduler(**SCHEDULE)
    ddpm.set_timesteps(num_inference_steps=args.ddpm_steps)
    ddim = DDIMScheduler(**SCHEDULE)
    ddim.set_timesteps(num_inference_steps=args.ddim_steps)
    inferer = DiffusionInferer(ddpm)
    samples = {}
    for name, scheduler in (("ddpm", ddpm), ("ddim", ddim)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            image = inferer.sample(input_noise=noise, diffusion_model=model, scheduler=scheduler, verbose=False)
        samples[name] = image.float()
    return samples


@torch.no_grad()
def sample_flow(args: argparse.Namespace, model: IDMUNet, noise: torch.Tensor) -> torch.Tensor:
    """MONAI's ``RFlowScheduler`` inference loop (its docstring's): Euler steps from noise to data."""
    scheduler = flow_scheduler()
    scheduler.set_timesteps(num_inference_steps=args.flow_steps, input_img_size_numel=noise[0, 0].numel())
    timesteps = scheduler.timesteps.tolist()
    image = noise
    for t, next_t in zip(timesteps, [*timesteps[1:], 0]):
        with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=args.amp):
            velocity = model(image, torch.full((image.shape[0],), t, device=image.device)).float()
        image, _ = scheduler.step(velocity, t, image, next_t)
    return image.clamp(-1.0, 1.0)  # the data range, as the DDPM schedulers' clip_sample


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_from(args.device)
    volumes = training_volumes(args)
    torch.manual_seed(args.seed)
    kwargs = model_kwargs(args)
    model = IDMUNet(**kwargs).to(device)
    if args.size % model.size_multiple:
        raise SystemExit(f"--size {args.size}: must be a multiple of {model.size_multiple} for --levels {args.levels}")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
    print(f"IDMUNet: {sum(p.numel() for p in model.parameters()):,} parameters on {device}", flush=True)
    losses = train(args, model, ema, volumes, device)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in ema.module.state_dict().items()}, str(args.out / "ema.safetensors"))
    samples = sample(args, ema.module, device)
    stats = {}
    for name, image in samples.items():
        save_volume(image[0], args.out / f"sample_{name}.nii.gz")
        stats[name] = {"shape": list(image.shape), "min": image.min().item(), "max": image.max().item(),
                       "mean": image.mean().item(), "finite": bool(torch.isfinite(image).all())}
    write_summary(args.out, {"model_kwargs": kwargs, "objective": args.objective, "schedule": SCHEDULE,
                             "steps": args.steps, "losses": losses, "samples": stats})
    names = ", ".join(f"sample_{n}.nii.gz" for n in samples)
    print(f"wrote {args.out}/ema.safetensors, {names}, summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
