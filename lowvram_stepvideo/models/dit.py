"""Step-Video-T2V DiT (`StepVideoModel`), docs/STEPVIDEO.md §3. Attribute names are the checkpoint keys.

Runtime knobs are plain attributes set from outside: each attention module's `attend` callable (see
`lowvram_stepvideo.attention.use_attention_backend`) and each FeedForward's `chunk_tokens` (see `set_ffn_chunk`).
Blocks take tensors only, so offload engines can attach forward-pre-hooks to them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiTConfig
from .layers import RMSNorm

ROPE_SPLIT = (64, 32, 32)   # head channels rotated by frame, height, width position (hard-coded in the release)
ROPE_BASE = 10000.0
SINUSOID_CHANNELS = 256
QK_NORM_EPS = 1e-6


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Default `attend`: q (B, Sq, H, D), k/v (B, Sk, H, D), key mask (B, Sk) bool -> (B, Sq, H, D)."""
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Sk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


# ---------------------------------------------------------------- 3D RoPE

def _axis_cos_sin(dim: int, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, dim) for positions 0..length-1 of one axis chunk."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, device=device).float() / dim))  # (dim/2,) float32
    pos = torch.arange(length, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq).to(dtype)  # quirk Q3: rounded to the activation dtype before cos/sin
    angles = torch.cat([angles, angles], dim=-1)   # (length, dim)
    return angles.cos(), angles.sin()


def rope_tables(frames: int, height: int, width: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (F*H*W, 128) for tokens in (f, h, w) raster order, in the activation dtype."""
    grid = torch.meshgrid(torch.arange(frames, device=device), torch.arange(height, device=device),
                          torch.arange(width, device=device), indexing="ij")
    cos_parts, sin_parts = [], []
    for pos, dim, length in zip(grid, ROPE_SPLIT, (frames, height, width)):
        cos, sin = _axis_cos_sin(dim, length, dtype, device)
        cos_parts.append(cos[pos.flatten()])  # (S, dim)
        sin_parts.append(sin[pos.flatten()])
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def _rotate_half_per_axis(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] inside each RoPE axis chunk (NeoX style, not interleaved)."""
    parts = []
    for chunk in x.split(ROPE_SPLIT, dim=-1):
        x1, x2 = chunk.chunk(2, dim=-1)
        parts += [-x2, x1]
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, 128), cos/sin (S, 128) -> (B, S, H, 128)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return x * cos + _rotate_half_per_axis(x) * sin


# ---------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, QK_NORM_EPS)
        self.k_norm = RMSNorm(head_dim, QK_NORM_EPS)
        self.attend = sdpa_attention

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.wqkv(x).view(b, s, self.num_heads, 3 * self.head_dim)  # rows interleaved per head: [q_h|k_h|v_h]
        q, k, v = qkv.split(self.head_dim, dim=-1)                          # (B, S, H, Dh) each
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin)
        k = apply_rope(self.k_norm(k), rope_cos, rope_sin)
        out = self.attend(q, k, v)                                          # (B, S, H, Dh)
        return self.wo(out.reshape(b, s, -1))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, QK_NORM_EPS)
        self.k_norm = RMSNorm(head_dim, QK_NORM_EPS)
        self.attend = sdpa_attention

    def forward(self, x: torch.Tensor, enc: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, s, self.num_heads, self.head_dim))   # (B, S, H, Dh)
        kv = self.wkv(enc).view(b, enc.shape[1], self.num_heads, 2 * self.head_dim)  # per head: [k_h|v_h]
        k, v = kv.split(self.head_dim, dim=-1)                                 # (B, Skv, H, Dh) each
        out = self.attend(q, self.k_norm(k), v, kv_mask)                       # (B, S, H, Dh)
        return self.wo(out.reshape(b, s, -1))


# ---------------------------------------------------------------- feed-forward

class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """net = [GELU(proj), Identity (dropout slot), Linear]. `chunk_tokens` bounds the (tokens, 4D) hidden."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim, bias=False)])
        self.chunk_tokens: int | None = None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.chunk_tokens
        if n is None or x.shape[:-1].numel() <= n:
            return self.mlp(x)
        rows = x.reshape(-1, x.shape[-1])  # (B*S, D): chunks are runs of tokens
        out = torch.empty_like(rows)
        for start in range(0, rows.shape[0], n):
            out[start:start + n] = self.mlp(rows[start:start + n])
        return out.view(x.shape)


def set_ffn_chunk(model: nn.Module, tokens: int | None) -> None:
    """Run every FeedForward of `model` over runs of `tokens` tokens (None: all at once). Same math."""
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"FFN chunk must be a positive number of tokens or None, got {tokens!r}")
    for m in model.modules():
        if isinstance(m, FeedForward):
            m.chunk_tokens = tokens


# ---------------------------------------------------------------- block

class StepVideoTransformerBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.scale_shift_table = nn.Parameter(torch.empty(6, d))
        self.norm1 = nn.LayerNorm(d, eps=cfg.block_norm_eps)
        self.attn1 = SelfAttention(d, cfg.num_heads, cfg.head_dim)
        self.norm2 = nn.LayerNorm(d, eps=cfg.block_norm_eps)
        self.attn2 = CrossAttention(d, cfg.num_heads, cfg.head_dim)
        self.ff = FeedForward(d)

    def forward(self, h: torch.Tensor, enc: torch.Tensor, mod: torch.Tensor, kv_mask: torch.Tensor | None,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """h (B, S, D), enc (B, Skv, D), mod (B, 6D), kv_mask (B, Skv) bool, rope_cos/sin (S, 128) -> (B, S, D)."""
        table = self.scale_shift_table[None] + mod.reshape(-1, 6, self.dim)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)  # (B, 1, D) each
        a = self.norm1(h) * (1 + scale_msa) + shift_msa
        h = gate_msa * self.attn1(a, rope_cos, rope_sin) + h
        h = self.attn2(h, enc, kv_mask) + h  # no norm, modulation or gate on cross-attention
        b = self.norm2(h) * (1 + scale_mlp) + shift_mlp
        return gate_mlp * self.ff(b) + h


# ---------------------------------------------------------------- embeddings

class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> (N, L, D), L = (H/p)(W/p) in row-major order."""
        return self.proj(x).to(x.dtype).flatten(2).transpose(1, 2)


class Timesteps(nn.Module):
    """Sinusoid of t*1000, always in float32 (quirk Q5): [cos, sin] with max period 1e4, no frequency shift."""

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
    def __init__(self, dim: int):
        super().__init__()
        self.time_proj = Timesteps()
        self.timestep_embedder = TimestepEmbedding(dim)

    def forward(self, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(s).to(dtype))


class AdaLayerNormSingle(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) in [0, 1) -> modulation (B, 6D), embedded_timestep (B, D)."""
        embedded = self.emb(timestep * 1000, dtype)  # quirk Q2: the product stays in the timestep's dtype
        return self.linear(self.silu(embedded)), embedded


class TextProjection(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


def cross_attention_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, Skv) of ones then zeros -> kv_lens (B,) int32, key mask (B, max kv_len) bool.

    Quirk Q1: the sum is taken in the mask's own dtype, so a bf16 mask of 257 ones counts 256."""
    kv_lens = mask.sum(dim=1).int()
    max_len = int(kv_lens.max())
    keys = torch.arange(max_len, device=mask.device)
    return kv_lens, keys[None, :] < kv_lens[:, None]


# ---------------------------------------------------------------- model

class StepVideoModel(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.head_dim != sum(ROPE_SPLIT):
            raise ValueError(f"Step-Video DiT needs head_dim {sum(ROPE_SPLIT)} (RoPE split {ROPE_SPLIT}), "
                             f"the config says {cfg.head_dim}")
        d, p = cfg.dim, cfg.patch_size
        self.cfg = cfg
        self.pos_embed = PatchEmbed(cfg.in_channels, d, p)
        self.transformer_blocks = nn.ModuleList(StepVideoTransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.empty(2, d))
        self.adaln_single = AdaLayerNormSingle(d)
        self.caption_norm = nn.LayerNorm(cfg.caption_channels[0], eps=cfg.norm_eps, elementwise_affine=False)
        self.caption_projection = TextProjection(cfg.caption_channels[0], d)
        self.clip_projection = nn.Linear(cfg.caption_channels[1], d)

    def embed_text(self, y: torch.Tensor, clip: torch.Tensor, mask: torch.Tensor | None):
        """y (B, Ly, Cy), clip (B, Lc, Cc), mask (B, Lc+Ly) -> enc (B, Skv, D), key mask (B, Skv) bool or None."""
        enc = torch.cat([self.clip_projection(clip), self.caption_projection(self.caption_norm(y))], dim=1)
        if mask is None:
            return enc, None
        _, kv_mask = cross_attention_mask(mask)
        return enc[:, :kv_mask.shape[1]], kv_mask  # keys past the longest prompt are dropped

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_2: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None):
        """hidden_states (B, F, C, H, W), timestep (B,) in [0, 1), encoder_hidden_states (B, Ly, 6144),
        encoder_hidden_states_2 (B, Lc, 1024), encoder_attention_mask (B, Lc+Ly) -> velocity (B, F, C, H, W)."""
        b, f, c, height, width = hidden_states.shape
        p = self.cfg.patch_size
        h = self.pos_embed(hidden_states.reshape(b * f, c, height, width))  # (B*F, L, D)
        h = h.reshape(b, -1, h.shape[-1])                                    # (B, F*L, D), frame-major
        mod, embedded_t = self.adaln_single(timestep, h.dtype)
        enc, kv_mask = self.embed_text(encoder_hidden_states, encoder_hidden_states_2, encoder_attention_mask)
        rope_cos, rope_sin = rope_tables(f, height // p, width // p, h.dtype, h.device)
        for block in self.transformer_blocks:
            h = block(h, enc, mod, kv_mask, rope_cos, rope_sin)
        return self.unpatchify(self.final_layer(h, embedded_t), f, height, width)

    def final_layer(self, h: torch.Tensor, embedded_t: torch.Tensor) -> torch.Tensor:
        """h (B, S, D), embedded_t (B, D) -> (B, S, p*p*C). Shift comes first and e gets no SiLU."""
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.proj_out(self.norm_out(h) * (1 + scale) + shift)

    def unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x (B, F*L, p*p*C) -> (B, F, C, H, W)."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        b = x.shape[0]
        x = x.reshape(b, frames, height // p, width // p, p, p, c)
        x = x.permute(0, 1, 6, 2, 4, 3, 5)  # (B, F, C, H/p, p, W/p, p)
        return x.reshape(b, frames, c, height, width)
