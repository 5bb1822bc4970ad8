"""Latent diffusion in 3D, as MONAI's 3D LDM tutorial, with idm3d's invertible ``IDMUNet`` as the latent denoiser.

Stage 1 trains MONAI's ``AutoencoderKL`` (L1 reconstruction + KL, and from ``--adv-start`` on a
``PatchDiscriminator`` with MONAI's least-squares ``PatchAdversarialLoss``). The tutorial's perceptual loss is
left out: it needs pretrained weights downloaded at run time. Stage 2 freezes the autoencoder, sets the
latent scale factor to ``1 / std`` of the first batch's latents (as the tutorial does) and trains ``IDMUNet``
on the latents through MONAI's ``LatentDiffusionInferer``; sampling runs DDIM in latent space and the
inferer decodes the result.

    python examples/latent_ddpm_3d.py --out runs/ldm3d                      # synthetic volumes, 32^3
    python examples/latent_ddpm_3d.py --data-dir DIR --size 64 --out runs/x  # your NIfTI volumes
    python examples/latent_ddpm_3d.py --smoke --out runs/ldm3d              # seconds on a CPU

Writes ``OUT/autoencoder.safetensors``, ``OUT/unet.safetensors``, ``OUT/reconstruction.nii.gz`` (a training
volume through the autoencoder), ``OUT/sample.nii.gz`` and ``OUT/summary.json`` (model kwargs, scale factor,
both stages' losses, the autoencoder's mean L1 error over the training volumes, sample statistics).
Data: see ``examples/volumes.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from monai.inferers import LatentDiffusionInferer
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from safetensors.torch import save_file
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

SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--ae-steps", type=int, default=1000, help="autoencoder training steps")
    parser.add_argument("--ae-channels", type=int, nargs="+", default=[32, 64, 64],
                        help="AutoencoderKL channels per level (latents are size / 2**(levels-1))")
    parser.add_argument("--latent-channels", type=int, default=3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--adv-weight", type=float, default=0.01)
    parser.add_argument("--adv-start", type=int, default=500, help="autoencoder step the adversarial loss starts at")
    parser.add_argument("--steps", type=int, default=2000, help="latent diffusion training steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--channels", type=int, default=16, help="IDMUNet core width at latent resolution")
    parser.add_argument("--levels", type=int, default=2, help="IDMUNet resolution levels (attention on the lowest)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM sampling steps")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.num_volumes, args.batch_size, args.ae_steps, args.adv_start = 16, 2, 2, 2, 1
        args.ae_channels, args.steps, args.channels, args.ddim_steps, args.log_every = [8, 16], 2, 8, 2, 1
    return args


def autoencoder_kwargs(args: argparse.Namespace) -> dict:
    levels = len(args.ae_channels)
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": list(args.ae_channels),
            "latent_channels": args.latent_channels, "num_res_blocks": 1, "norm_num_groups": min(args.ae_channels),
            "attention_levels": [False] * levels, "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False}


def unet_kwargs(args: argparse.Namespace) -> dict:
    return {"spatial_dims": 3, "in_channels": args.latent_channels, "out_channels": args.latent_channels,
            "channels": args.channels, "levels": args.levels,
            "attention_levels": [False] * (args.levels - 1) + [True]}


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.sum(dim=list(range(1, kl.dim()))).mean()


def train_autoencoder(args: argparse.Namespace, autoencoder: AutoencoderKL, volumes: list[torch.Tensor],
                      device: torch.device) -> list[float]:
    discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=min(args.ae_channels),
                                       in_channels=1, out_channels=1).to(device)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    opt_g = torch.optim.Adam(autoencoder.parameters(), lr=args.lr)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr)
    data, losses, start = batches(volumes, args.batch_size, args.seed), [], time.perf_counter()
    for step in range(1, args.ae_steps + 1):
        images = next(data).to(device)
        opt_g.zero_grad(set_to_none=True)
        reconstruction, z_mu, z_sigma = autoencoder(images)
        loss = F.l1_loss(reconstruction, images) + args.kl_weight * kl_loss(z_mu, z_sigma)
        adv = step >= args.adv_start
        if adv:
            fake = discriminator(reconstruction.contiguous())[-1]
            loss = loss + args.adv_weight * adversarial(fake, target_is_real=True, for_discriminator=False)
        losses.append(check_finite(loss, step, "autoencoder"))
        loss.backward()
        opt_g.step()
        if adv:
            opt_d.zero_grad(set_to_none=True)
            fake = discriminator(reconstruction.contiguous().detach())[-1]
            real = discriminator(images.contiguous())[-1]
            d_loss = 0.5 * (adversarial(fake, target_is_real=False, for_discriminator=True)
                            + adversarial(real, target_is_real=True, for_discriminator=True))
            check_finite(d_loss, step, "discriminator")
            (args.adv_weight * d_loss).backward()
            opt_d.step()
        if step % args.log_every == 0 or step == args.ae_steps:
            print(f"autoencoder step {step}/{args.ae_steps}  loss {losses[-1]:.4f}  "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    return losses


def train_unet(args: argparse.Namespace, autoencoder: AutoencoderKL, unet: IDMUNet, volumes: list[torch.Tensor],
               device: torch.device) -> tuple[LatentDiffusionInferer, list[float]]:
    autoencoder.eval().requires_grad_(False)
    data = batches(volumes, args.batch_size, args.seed)
    with torch.no_grad():
        z = autoencoder.encode_stage_2_inputs(next(data).to(device))
    scale_factor = 1.0 / z.flatten().std().item()
    print(f"latents {tuple(z.shape[1:])}, scale factor {scale_factor:.4f}", flush=True)
    scheduler = DDPMScheduler(**SCHEDULE)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=scale_factor)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr)
    losses, start = [], time.perf_counter()
    unet.train()
    for step in range(1, args.steps + 1):
        images = next(data).to(device)
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn((images.shape[0], *z.shape[1:]), device=device)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],), device=device).long()
        noise_pred = inferer(inputs=images, autoencoder_model=autoencoder, diffusion_model=unet, noise=noise,
                             timesteps=timesteps)
        loss = F.mse_loss(noise_pred.float(), noise.float())
        losses.append(check_finite(loss, step, "latent diffusion"))
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            print(f"latent diffusion step {step}/{args.steps}  loss {losses[-1]:.4f}  "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    return inferer, losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_from(args.device)
    volumes = training_volumes(args)
    torch.manual_seed(args.seed)
    ae_kwargs, net_kwargs = autoencoder_kwargs(args), unet_kwargs(args)
    autoencoder = AutoencoderKL(**ae_kwargs).to(device)
    unet = IDMUNet(**net_kwargs).to(device)
    latent = args.size // 2 ** (len(args.ae_channels) - 1)
    if latent * 2 ** (len(args.ae_channels) - 1) != args.size or latent % unet.size_multiple:
        raise SystemExit(f"--size {args.size}: the latent edge (size / {2 ** (len(args.ae_channels) - 1)}) must be "
                         f"a whole multiple of {unet.size_multiple} for --levels {args.levels}")
    ae_losses = train_autoencoder(args, autoencoder, volumes, device)
    inferer, losses = train_unet(args, autoencoder, unet, volumes, device)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in autoencoder.state_dict().items()},
              str(args.out / "autoencoder.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in unet.state_dict().items()}, str(args.out / "unet.safetensors"))
    unet.eval()
    with torch.no_grad():
        reconstructions = [autoencoder.reconstruct(v[None].to(device))[0] for v in volumes]
        recon_l1 = sum(F.l1_loss(r, v.to(device)).item() for r, v in zip(reconstructions, volumes)) / len(volumes)
        save_volume(reconstructions[0], args.out / "reconstruction.nii.gz")
        ddim = DDIMScheduler(**SCHEDULE)
        ddim.set_timesteps(num_inference_steps=args.ddim_steps)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        noise = torch.randn((1, args.latent_channels, latent, latent, latent), generator=gen, device=device)
        image = inferer.sample(input_noise=noise, autoencoder_model=autoencoder, diffusion_model=unet,
                               scheduler=ddim, verbose=False)
    save_volume(image[0], args.out / "sample.nii.gz")
    write_summary(args.out, {
        "autoencoder_kwargs": ae_kwargs, "model_kwargs": net_kwargs, "schedule": SCHEDULE,
        "scale_factor": inferer.scale_factor, "reconstruction_l1": recon_l1, "latent_shape": list(noise.shape[1:]),
        "autoencoder_losses": ae_losses, "losses": losses,
        "sample": {"shape": list(image.shape), "min": image.min().item(), "max": image.max().item(),
                   "finite": bool(torch.isfinite(image).all())}})
    print(f"wrote {args.out}/autoencoder.safetensors, unet.safetensors, reconstruction.nii.gz, sample.nii.gz, "
          "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
