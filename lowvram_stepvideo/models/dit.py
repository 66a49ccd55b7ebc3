"""Step-Video DiT (`StepVideoModel`), docs/STEPVIDEO.md §3. Attribute names are the checkpoint keys. One class for
both releases: Step-Video-T2V, and Step-Video-TI2V (`config.use_additional_conditions`, §3.5), whose patch embedding
takes the noisy latents concatenated with the first image's condition latents and whose timestep embedding adds a
motion-score embedding.

Runtime knobs are plain attributes set from outside; none of them changes the math:
- each attention module's `attend` callable (see `lowvram_stepvideo.engines.attention.use_attention_backend`);
- `chunk_tokens` on the model, its blocks, attention modules and FeedForwards (see `set_token_chunk`): every
  token-wise op (modulated norms, QK-norm + RoPE, attention output projections, gated residuals, FFN, final
  layer) runs over runs of at most that many tokens, so besides a few (B, S, D) tensors nothing full-length lives;
- `head_chunk` on the attention modules (see `set_attention_head_chunk`): attention runs for a group of heads at a
  time, each group projecting only its own rows of the fused weights into one (B, S, H*Dh) buffer for Wo;
- `sequence` on the model (a `WholeSequence` by default): which tokens this process runs through the blocks and how
  the final layer's output becomes the whole sequence again (lowvram_stepvideo.engines.parallel splits them across ranks).
Blocks take tensors only, so offload engines can attach forward-pre-hooks to them; `forward_blocks` (the plain
loop over them, handed the hidden states as its own) may be replaced on the instance by an engine such as the step
cache.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..files.configs import DiTConfig
from .dit_embeddings import AdaLayerNormSingle, PatchEmbed, TextProjection
from .layers import RMSNorm, row_projector, sdpa

ROPE_SPLIT = (64, 32, 32)   # head channels rotated by frame, height, width position (hard-coded in the release)
ROPE_BASE = 10000.0
QK_NORM_EPS = 1e-6


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


# ---------------------------------------------------------------- token runs and head groups

def token_runs(seq_len: int, batch: int, tokens: int | None) -> list[slice]:
    """Runs of sequence positions covering 0..seq_len, each at most `tokens` tokens over the batch (at least one
    position per run); a single run when `tokens` is None."""
    step = seq_len if tokens is None else max(1, tokens // batch)
    return [slice(i, min(i + step, seq_len)) for i in range(0, seq_len, max(step, 1))]


def tokenwise(fn: Callable[..., torch.Tensor], tokens: int | None, *xs: torch.Tensor) -> torch.Tensor:
    """fn(*xs) for a token-wise `fn` of (B, S, ...) tensors, computed a run of positions at a time into one new
    output (B, S, ...), so fn's temporaries never span the whole sequence."""
    b, s = xs[0].shape[:2]
    runs = token_runs(s, b, tokens)
    if len(runs) <= 1:
        return fn(*xs)
    first = fn(*(x[:, runs[0]] for x in xs))
    out = first.new_empty((b, s) + tuple(first.shape[2:]))
    out[:, runs[0]] = first
    del first
    for run in runs[1:]:
        out[:, run] = fn(*(x[:, run] for x in xs))
    return out


def normalise_in_place(x: torch.Tensor, norm: nn.Module, tokens: int | None, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None) -> None:
    """x (B, S, G, Dh) <- norm(x), then RoPE with cos/sin (S, Dh) when given, a run of positions at a time. x may be
    a view into a fused projection output; each run is computed in full before it is written back."""
    for run in token_runs(x.shape[1], x.shape[0], tokens):
        y = norm(x[:, run])
        x[:, run] = y if cos is None else apply_rope(y, cos[run], sin[run])


def project_in_place(linear: nn.Module, x: torch.Tensor, tokens: int | None) -> torch.Tensor:
    """linear(x) for x (B, S, D) and a D -> D `linear`; with `tokens`, computed a run of tokens at a time and
    written over x, which is consumed (no second full-size tensor)."""
    x = x.contiguous()
    rows = x.view(-1, x.shape[-1])  # (B*S, D): runs of tokens
    if tokens is None or rows.shape[0] <= tokens:
        return linear(x)
    for start in range(0, rows.shape[0], tokens):
        rows[start:start + tokens] = linear(rows[start:start + tokens])
    return x


def attend_in_head_groups(heads: Callable[[int, int], torch.Tensor], num_heads: int, head_dim: int,
                          group: int | None, like: torch.Tensor) -> torch.Tensor:
    """Attention output (B, S, H*Dh) from heads(first, last) -> (B, S, last - first, Dh), called for `group` heads
    at a time and written into one buffer; one call for all heads (no buffer) when `group` is None or covers them.
    `like`: a (B, S, ...) tensor giving batch, length, dtype and device."""
    b, s = like.shape[:2]
    if group is None or group >= num_heads:
        return heads(0, num_heads).reshape(b, s, num_heads * head_dim)
    out = like.new_empty((b, s, num_heads, head_dim))
    for first in range(0, num_heads, group):
        last = min(first + group, num_heads)
        out[:, :, first:last] = heads(first, last)
    return out.view(b, s, num_heads * head_dim)


# ---------------------------------------------------------------- attention

class HeadAttention(nn.Module):
    """What self- and cross-attention share: output projection, QK-RMSNorm, the attention kernel (set from
    outside) and the runtime knobs (head groups, token runs)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, **projections: nn.Linear):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        for name, linear in projections.items():   # registered first: the checkpoint's key order
            setattr(self, name, linear)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, QK_NORM_EPS)
        self.k_norm = RMSNorm(head_dim, QK_NORM_EPS)
        self.attend = sdpa
        self.head_chunk: int | None = None
        self.chunk_tokens: int | None = None


class SelfAttention(HeadAttention):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__(dim, num_heads, head_dim, wqkv=nn.Linear(dim, 3 * dim, bias=False))

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), rope_cos/sin (S, Dh) -> (B, S, D)."""
        qkv_rows = row_projector(self.wqkv, x)
        width = 3 * self.head_dim  # wqkv rows are interleaved per head: [q_h | k_h | v_h]

        def heads(first: int, last: int) -> torch.Tensor:
            return self.head_group(qkv_rows(width * first, width * last), rope_cos, rope_sin)
        out = attend_in_head_groups(heads, self.num_heads, self.head_dim, self.head_chunk, x)
        return project_in_place(self.wo, out, self.chunk_tokens)

    def head_group(self, qkv: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """qkv (B, S, G*3*Dh) of G heads -> attention output (B, S, G, Dh)."""
        b, s, _ = qkv.shape
        dh = self.head_dim
        qkv = qkv.view(b, s, -1, 3 * dh)                                   # (B, S, G, 3*Dh)
        q, k, v = (qkv[..., i * dh:(i + 1) * dh] for i in range(3))         # (B, S, G, Dh) views, written in place
        normalise_in_place(q, self.q_norm, self.chunk_tokens, rope_cos, rope_sin)
        normalise_in_place(k, self.k_norm, self.chunk_tokens, rope_cos, rope_sin)
        return self.attend(q, k, v)


class CrossAttention(HeadAttention):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__(dim, num_heads, head_dim, wq=nn.Linear(dim, dim, bias=False),
                         wkv=nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x: torch.Tensor, enc: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, S, D), enc (B, Skv, D), kv_mask (B, Skv) bool or None -> (B, S, D)."""
        q_rows, kv_rows = row_projector(self.wq, x), row_projector(self.wkv, enc)
        dh = self.head_dim  # wq rows are head-major; wkv rows are interleaved per head: [k_h | v_h]

        def heads(first: int, last: int) -> torch.Tensor:
            return self.head_group(q_rows(dh * first, dh * last), kv_rows(2 * dh * first, 2 * dh * last), kv_mask)
        out = attend_in_head_groups(heads, self.num_heads, dh, self.head_chunk, x)
        return project_in_place(self.wo, out, self.chunk_tokens)

    def head_group(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, S, G*Dh), kv (B, Skv, G*2*Dh) of G heads -> attention output (B, S, G, Dh)."""
        dh = self.head_dim
        q = q.view(q.shape[0], q.shape[1], -1, dh)                     # (B, S, G, Dh)
        k, v = kv.view(kv.shape[0], kv.shape[1], -1, 2 * dh).split(dh, dim=-1)  # (B, Skv, G, Dh) each
        normalise_in_place(q, self.q_norm, self.chunk_tokens)
        return self.attend(q, self.k_norm(k), v, kv_mask)


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


def set_token_chunk(model: nn.Module, tokens: int | None) -> None:
    """Run the FFN and every other token-wise op of `model` (modulated norms, QK-norm + RoPE, attention output
    projections, gated residuals, final layer) over runs of at most `tokens` tokens (None: all at once). Same math;
    a matmul over fewer rows may sum in another order, so floats can differ in the last bits."""
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"token chunk must be a positive number of tokens or None, got {tokens!r}")
    chunked = (FeedForward, SelfAttention, CrossAttention, StepVideoTransformerBlock, StepVideoModel)
    for m in model.modules():
        if isinstance(m, chunked):
            m.chunk_tokens = tokens


def set_attention_head_chunk(model: nn.Module, heads: int | None) -> None:
    """Run every self- and cross-attention of `model` for `heads` heads at a time (None: all heads at once). Each
    group projects only its rows of the fused weights; the (B, S, H*Dh) output buffer then goes through Wo once."""
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"attention head chunk must be a positive number of heads or None, got {heads!r}")
    for m in model.modules():
        if isinstance(m, (SelfAttention, CrossAttention)):
            m.head_chunk = heads


# ---------------------------------------------------------------- block

class StepVideoTransformerBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.dim
        self.dim = d
        self.scale_shift_table = nn.Parameter(torch.empty(6, d))
        self.norm1 = nn.LayerNorm(d, eps=config.block_norm_eps)
        self.attn1 = SelfAttention(d, config.num_heads, config.head_dim)
        self.norm2 = nn.LayerNorm(d, eps=config.block_norm_eps)
        self.attn2 = CrossAttention(d, config.num_heads, config.head_dim)
        self.ff = FeedForward(d)
        self.chunk_tokens: int | None = None

    def forward(self, h: torch.Tensor, enc: torch.Tensor, mod: torch.Tensor, kv_mask: torch.Tensor | None,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """h (B, S, D), enc (B, Skv, D), mod (B, 6D), kv_mask (B, Skv) bool, rope_cos/sin (S, 128) -> (B, S, D).

        The input h is never written to; the block's own tensors are updated in place where that saves a
        full-size allocation (x + h and h + x round identically)."""
        table = self.scale_shift_table[None] + mod.reshape(-1, 6, self.dim)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)  # (B, 1, D) each
        a = tokenwise(lambda t: self.norm1(t) * (1 + scale_msa) + shift_msa, self.chunk_tokens, h)
        x = self.attn1(a, rope_cos, rope_sin)
        del a
        h = tokenwise(lambda x_, h_: gate_msa * x_ + h_, self.chunk_tokens, x, h)  # a new tensor
        del x
        h.add_(self.attn2(h, enc, kv_mask))  # no norm, modulation or gate on cross-attention
        return self._ffn_residual(h, shift_mlp, scale_mlp, gate_mlp)

    def _ffn_residual(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor):
        """h + gate * ff(norm2(h) * (1 + scale) + shift), written over h (this block's own tensor) a run at a time."""
        for run in token_runs(h.shape[1], h.shape[0], self.chunk_tokens):
            part = h[:, run]                                       # (B, n, D) view
            ffn = self.ff(self.norm2(part) * (1 + scale) + shift)  # the modulated input is freed once ff returns
            part.add_(gate * ffn)
            del ffn
        return h


# Modules whose linears are called once per token run (attention output projections in the attention modules, the
# FFN per run of the block): an engine may keep a quantized linear's expanded weight for the duration of one call
# of the innermost of these that holds it (quant.keep_expanded_weights).
TOKEN_RUN_SCOPES = (SelfAttention, CrossAttention, StepVideoTransformerBlock)


def cross_attention_mask(mask: torch.Tensor, keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, Skv) of ones then zeros -> kv_lens (B,) int32, key mask (B, keys) bool (keys: default Skv): the
    first kv_len keys. Like the reference, only the mask's sum counts, so a mask shorter than the text sequence
    (the TI2V fixture's) masks the keys past its sum.

    Quirk Q1: the sum is taken in the mask's own dtype, so a bf16 mask of 257 ones counts 256. The reference then
    drops the keys past the longest kv_len; they are masked for every row here instead, which gives the same
    attention without reading a length back from the device (no sync, and shapes that do not depend on data)."""
    kv_lens = mask.sum(dim=1).int()
    keys = torch.arange(mask.shape[1] if keys is None else keys, device=mask.device)
    return kv_lens, keys[None, :] < kv_lens[:, None]


def key_mask(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """The cross-attention key mask (B, keys) bool of the reference's mask (B, Lc+Ly), as `cross_attention_mask`
    makes it, built once for a whole denoising phase: the DiT takes it in place of the mask. It keeps the first
    kv_len keys of each row and carries those counts as host ints (`kv_lengths`), read here once, so a kernel that
    takes no mask (flash-attn) selects each row's keys by slicing, without reading anything back from the device
    at each call. Data-free (meta) tensors, the memory plan's, carry none."""
    _, keep = cross_attention_mask(mask, keys)
    if not keep.is_meta:
        keep.kv_lengths = tuple(int(n) for n in keep.sum(dim=1).tolist())   # the one read, once per phase
    return keep


def key_mask_rows(keep: torch.Tensor, rows: slice) -> torch.Tensor:
    """keep[rows] with its rows' `kv_lengths` (a plain slice of a tensor carries none)."""
    part = keep[rows]
    lengths = getattr(keep, "kv_lengths", None)
    if lengths is not None:
        part.kv_lengths = lengths[rows]
    return part


# ---------------------------------------------------------------- model

class WholeSequence:
    """The model's default token layout: every token in this process."""

    def scatter(self, h: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        """h (B, S, D), rope_cos/sin (S, 128) -> the same for the tokens this process runs."""
        return h, rope_cos, rope_sin

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The final layer's output for this process's tokens -> (B, S, p*p*C) for the whole sequence."""
        return out


class StepVideoModel(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.head_dim != sum(ROPE_SPLIT):
            raise ValueError(f"Step-Video DiT needs head_dim {sum(ROPE_SPLIT)} (RoPE split {ROPE_SPLIT}), "
                             f"the config says {config.head_dim}")
        d, p = config.dim, config.patch_size
        self.config = config
        self.pos_embed = PatchEmbed(config.patch_in_channels, d, p)
        self.transformer_blocks = nn.ModuleList(StepVideoTransformerBlock(config) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(d, eps=config.norm_eps, elementwise_affine=False)
        self.proj_out = nn.Linear(d, p * p * config.out_channels)
        self.scale_shift_table = nn.Parameter(torch.empty(2, d))
        self.adaln_single = AdaLayerNormSingle(d, motion=config.use_additional_conditions)
        self.caption_norm = nn.LayerNorm(config.caption_channels[0], eps=config.norm_eps, elementwise_affine=False)
        self.caption_projection = TextProjection(config.caption_channels[0], d)
        self.clip_projection = nn.Linear(config.caption_channels[1], d)
        self.chunk_tokens: int | None = None  # final layer over runs of tokens (see set_token_chunk)
        self.sequence = WholeSequence()

    def embed_text(self, y: torch.Tensor, clip: torch.Tensor, mask: torch.Tensor | None):
        """y (B, Ly, Cy), clip (B, Lc, Cc), mask (B, Lc+Ly) or a key mask (B, Skv) bool made by `key_mask` ->
        enc (B, Skv, D), key mask (B, Skv) bool or None."""
        enc = torch.cat([self.clip_projection(clip), self.caption_projection(self.caption_norm(y))], dim=1)
        if mask is None or mask.dtype != torch.bool:
            return enc, None if mask is None else cross_attention_mask(mask, enc.shape[1])[1]
        if tuple(mask.shape) != tuple(enc.shape[:2]):
            raise ValueError(f"a key mask (bool) must be (B, Skv) = {tuple(enc.shape[:2])} for this text, got "
                             f"{tuple(mask.shape)}; pass the reference's (B, Lc+Ly) mask in another dtype")
        return enc, mask

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_2: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
                condition_hidden_states: torch.Tensor | None = None, motion_score: torch.Tensor | None = None):
        """hidden_states (B, F, C, H, W), timestep (B,) in [0, 1), encoder_hidden_states (B, Ly, 6144),
        encoder_hidden_states_2 (B, Lc, 1024), encoder_attention_mask (B, Lc+Ly), or the key mask `key_mask` built
        from it once per phase -> velocity (B, F, C, H, W).
        TI2V only (and required there): condition_hidden_states (B, F, C, H, W), motion_score (B,)."""
        b, f, c, height, width = hidden_states.shape
        p = self.config.patch_size
        x = self.conditioned(hidden_states, condition_hidden_states)
        h = self.pos_embed(x.reshape(b * f, x.shape[2], height, width))      # (B*F, L, D)
        del x
        h = h.reshape(b, -1, h.shape[-1])                                    # (B, F*L, D), frame-major
        mod, embedded_t = self.adaln_single(timestep, h.dtype, motion_score)
        enc, kv_mask = self.embed_text(encoder_hidden_states, encoder_hidden_states_2, encoder_attention_mask)
        rope_cos, rope_sin = rope_tables(f, height // p, width // p, h.dtype, h.device)
        h, rope_cos, rope_sin = self.sequence.scatter(h, rope_cos, rope_sin)   # the tokens this process runs
        handed = [h]        # forward_blocks takes the only reference (see there)
        del h
        h = self.forward_blocks(handed, enc, mod, kv_mask, rope_cos, rope_sin)
        out = self.sequence.gather(self.final_layer(h, embedded_t))             # (B, F*L, p*p*C)
        return self.unpatchify(out, f, height, width)

    def conditioned(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """What the patch embedding takes: x itself (T2V), or x and the condition latents concatenated on the
        channel axis, noisy latents first (TI2V)."""
        if not self.config.use_additional_conditions:
            if condition is not None:
                raise ValueError("this DiT (Step-Video-T2V) takes no condition latents; only a TI2V DiT does")
            return x
        if condition is None or condition.shape != x.shape:
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"a Step-Video-TI2V DiT needs condition latents of the latents' shape {tuple(x.shape)}, "
                             f"got {got}")
        return torch.cat([x, condition.to(x.dtype)], dim=2)

    def forward_blocks(self, handed: list[torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        """The block stack: `handed` = [h (B, S, D)] and the blocks' other inputs -> (B, S, D). h is taken out of the
        list, so it is freed once the first block has run and every block runs with the same tensors alive (a
        block's memory does not depend on its place in the stack). An engine may replace this on the instance (e.g.
        a step cache that skips blocks)."""
        h = handed.pop()
        for block in self.transformer_blocks:
            h = block(h, *args)
        return h

    def final_layer(self, h: torch.Tensor, embedded_t: torch.Tensor) -> torch.Tensor:
        """h (B, S, D), embedded_t (B, D) -> (B, S, p*p*C). Shift comes first and e gets no SiLU."""
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return tokenwise(lambda t: self.proj_out(self.norm_out(t) * (1 + scale) + shift), self.chunk_tokens, h)

    def unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x (B, F*L, p*p*C) -> (B, F, C, H, W)."""
        p, c = self.config.patch_size, self.config.out_channels
        b = x.shape[0]
        x = x.reshape(b, frames, height // p, width // p, p, p, c)
        x = x.permute(0, 1, 6, 2, 4, 3, 5)  # (B, F, C, H/p, p, W/p, p)
        return x.reshape(b, frames, c, height, width)
