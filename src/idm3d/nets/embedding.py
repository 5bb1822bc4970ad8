"""Timestep (and optional context) embedding shared by every coupling of the denoiser."""

from __future__ import annotations

from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import Tensor, nn

__all__ = ["TimestepEmbedding"]


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep features followed by an MLP, plus an optional context projection.

    Args:
        base_dim: size of the sinusoidal features.
        embed_dim: size of the output embedding.
        context_dim: size of a per-sample context vector to add (``None`` for none).
    """

    def __init__(self, base_dim: int, embed_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.context_dim = context_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.context = nn.Linear(context_dim, embed_dim) if context_dim else None

    def forward(self, timesteps: Tensor, batch: int, context: Tensor | None = None) -> Tensor:
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.dim() != 1 or timesteps.shape[0] not in (1, batch):
            raise ValueError(f"timesteps: expected shape ({batch},), got {tuple(timesteps.shape)}")
        timesteps = timesteps.expand(batch)
        dtype = self.mlp[0].weight.dtype
        emb = self.mlp(get_timestep_embedding(timesteps, self.base_dim).to(dtype))
        if context is not None:
            if self.context is None:
                raise ValueError("context was given but the network was built with context_dim=None")
            # MONAI passes context as (B, 1, dim) for cross-attention; a vector per sample is what we use.
            if context.dim() == 3 and context.shape[1] == 1:
                context = context[:, 0]
            if context.dim() != 2 or context.shape != (batch, self.context_dim):
                raise ValueError(
                    f"context: expected shape ({batch}, {self.context_dim}) or ({batch}, 1, {self.context_dim}), "
                    f"got {tuple(context.shape)}"
                )
            emb = emb + self.context(context.to(dtype))
        elif self.context is not None:
            raise ValueError(f"context: the network needs a context of size {self.context_dim}, got None")
        return emb
