"""step_llm (`Step1Model`): the 48-layer decoder-only text encoder, GQA with sqrt-ALiBi causal attention.

Attribute names are the release's checkpoint keys. The release's attention is a closed CUDA kernel; this is its
portable equivalent (STEPVIDEO.md §6.1): causal softmax attention with bias -slope_h * sqrt(i - j), softmax in
float32, evaluated in tiles so the float32 score tensor never exceeds `score_budget_bytes`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..files.configs import ConfigError, StepLLMConfig
from .layers import RMSNorm, empty_embedding

DEFAULT_SCORE_BUDGET_BYTES = 64 * 2**20   # float32 scores held at once per attention call
FFN_MULTIPLE_OF = 256


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """(H,) float32 slopes: 2^(-8k/n) for k = 1..n (n = 2^floor(log2 H)), then 2^(-4(2k-1)/n) for the rest."""
    n = 2 ** math.floor(math.log2(num_heads))
    k = torch.arange(1, n + 1, device=device, dtype=torch.float32)
    slopes = torch.pow(2.0, -8.0 * k / n)
    if num_heads > n:
        odd = torch.arange(1, 2 * (num_heads - n), 2, device=device, dtype=torch.float32)
        slopes = torch.cat([slopes, torch.pow(2.0, -4.0 * odd / n)])
    return slopes


def _attend_tile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, q_start: int):
    """One tile: q (B, h, Sq, D) at positions q_start.., k/v (B, 1, Sk, D) with Sk = q_start + Sq (keys beyond the
    last query are causally invisible), slopes (h,). Returns (B, h, Sq, D) in v's dtype."""
    sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
    scores = torch.matmul(q.float() * d ** -0.5, k.float().transpose(-1, -2))  # (B, h, Sq, Sk) float32
    pos_q = torch.arange(q_start, q_start + sq, device=q.device)
    dist = (pos_q[:, None] - torch.arange(sk, device=q.device)[None, :]).float()  # (Sq, Sk): i - j
    scores.addcmul_(-slopes.view(-1, 1, 1), dist.clamp(min=0).sqrt())
    scores.masked_fill_(dist < 0, float("-inf"))
    # in-place softmax: the tile is the largest buffer here, so avoid a second float32 copy of it
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    scores.div_(scores.sum(-1, keepdim=True))
    return torch.matmul(scores.to(v.dtype), v)


def sqrt_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         budget_bytes: int = DEFAULT_SCORE_BUDGET_BYTES) -> torch.Tensor:
    """Causal GQA attention with the sqrt-ALiBi bias. q (B, G, r, S, D): r query heads per KV group (global head
    g*r + i); k, v (B, G, S, D). Returns (B, G, r, S, D). Tiles over groups, heads and query blocks."""
    b, groups, r, s, d = q.shape
    slopes = alibi_slopes(groups * r, device=q.device).view(groups, r)
    rows = max(1, budget_bytes // (b * s * 4))      # (head, query) rows of float32 scores that fit the budget
    heads_per_tile = min(r, rows)
    q_block = max(1, min(s, rows // heads_per_tile))
    out = torch.empty_like(q, dtype=v.dtype)
    for g in range(groups):
        kg, vg = k[:, g, None], v[:, g, None]        # (B, 1, S, D), broadcast over the group's heads
        for h0 in range(0, r, heads_per_tile):
            h1 = min(r, h0 + heads_per_tile)
            for q0 in range(0, s, q_block):
                q1 = min(s, q0 + q_block)
                out[:, g, h0:h1, q0:q1] = _attend_tile(q[:, g, h0:h1, q0:q1], kg[:, :, :q1], vg[:, :, :q1],
                                                       slopes[g, h0:h1], q0)
    return out


class MultiQueryAttention(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.num_heads, self.num_groups, self.head_dim = config.num_heads, config.num_groups, config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, config.hidden_size + 2 * config.num_groups * config.head_dim, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.score_budget_bytes = DEFAULT_SCORE_BUDGET_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, hidden = x.shape
        groups, d = self.num_groups, self.head_dim
        xq, xkv = self.wqkv(x).split([hidden, 2 * groups * d], dim=-1)
        q = xq.view(b, s, groups, self.num_heads // groups, d).permute(0, 2, 3, 1, 4)  # (B, G, r, S, D)
        xkv = xkv.view(b, s, groups, 2 * d).transpose(1, 2)                            # (B, G, S, 2D): [K_g | V_g]
        k, v = xkv.chunk(2, dim=-1)                                                     # (B, G, S, D) each
        out = sqrt_alibi_attention(q, k, v, self.score_budget_bytes)                    # (B, G, r, S, D)
        return self.wo(out.permute(0, 3, 1, 2, 4).reshape(b, s, hidden))                # heads g*r+i in order


class FeedForward(nn.Module):
    """SwiGLU: w1 gives [gate | up]; the hidden width is rounded up to a multiple of 256 like the release."""

    def __init__(self, config: StepLLMConfig):
        super().__init__()
        hidden = FFN_MULTIPLE_OF * math.ceil(config.ffn_hidden_size / FFN_MULTIPLE_OF)
        self.w1 = nn.Linear(config.hidden_size, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.attention = MultiQueryAttention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Embedding(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.word_embeddings = empty_embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class Transformer(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))


class Step1Model(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        if config.num_heads * config.head_dim != config.hidden_size or config.num_heads % config.num_groups:
            raise ConfigError(f"step_llm config: {config.num_heads} heads x {config.head_dim} must equal hidden "
                              f"{config.hidden_size} and be divisible into {config.num_groups} groups")
        self.config = config
        self.tok_embeddings = Embedding(config)
        self.transformer = Transformer(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> last block's output (B, S, hidden), no final norm. `attention_mask` is ignored like
        in the release: padding positions are computed causally and masked later by the DiT."""
        x = self.tok_embeddings(input_ids)  # (B, S, hidden)
        for layer in self.transformer.layers:
            x = layer(x)
        return x
