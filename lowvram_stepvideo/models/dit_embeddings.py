"""The DiT's input embeddings (docs/STEPVIDEO.md §3.3 steps 1-3, §3.5): patch embedding, timestep (and, for
Step-Video-TI2V, motion score) embedding with the AdaLN-single modulation, and the caption projection.
Attribute names are the checkpoint keys."""
from __future__ import annotations

import math

import torch
from torch import nn

SINUSOID_CHANNELS = 256


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> (N, L, D), L = (H/p)(W/p) in row-major order."""
        return self.proj(x).to(x.dtype).flatten(2).transpose(1, 2)


class Timesteps(nn.Module):
    """Sinusoid of a scalar per sample, always in float32 (quirk Q5): [cos, sin] with max period 1e4, no frequency
    shift. The timestep is fed as t*1000, the TI2V motion score as it is."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s (B,) -> (B, 256) float32."""
        half = SINUSOID_CHANNELS // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=s.device) / half
        args = s[:, None].float() * torch.exp(exponent)[None, :]  # (B, 128)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(SINUSOID_CHANNELS, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CombinedTimestepEmbedding(nn.Module):
    """The embedded timestep; with `motion` (TI2V: use_additional_conditions) the motion score's embedding, from
    the same sinusoid and its own two linears, is added to it."""

    def __init__(self, dim: int, motion: bool = False):
        super().__init__()
        self.time_proj = Timesteps()
        self.timestep_embedder = TimestepEmbedding(dim)
        if motion:
            self.additional_condition_proj = Timesteps()
            self.motion_score_embedder = TimestepEmbedding(dim)

    @property
    def takes_motion(self) -> bool:
        return hasattr(self, "motion_score_embedder")

    def forward(self, s: torch.Tensor, dtype: torch.dtype, motion_score: torch.Tensor | None = None) -> torch.Tensor:
        embedded = self.timestep_embedder(self.time_proj(s).to(dtype))
        if not self.takes_motion:
            if motion_score is not None:
                raise ValueError("this DiT (Step-Video-T2V) takes no motion score; only a TI2V DiT does")
            return embedded
        if motion_score is None:
            raise ValueError("a Step-Video-TI2V DiT needs a motion score (the reference default is 5)")
        motion = self.motion_score_embedder(self.additional_condition_proj(motion_score.flatten()).to(dtype))
        return embedded + motion


class AdaLayerNormSingle(nn.Module):
    def __init__(self, dim: int, motion: bool = False):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(dim, motion)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype,
                motion_score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) in [0, 1), motion_score (B,) (TI2V only) -> modulation (B, 6D), embedded_timestep (B, D)."""
        embedded = self.emb(timestep * 1000, dtype, motion_score)  # quirk Q2: the product stays in t's dtype
        return self.linear(self.silu(embedded)), embedded


class TextProjection(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))
