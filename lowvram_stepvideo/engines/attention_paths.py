"""How a chosen attention kernel runs on a card, beyond the kernel itself.

- `HalfPrecision`: the kernel on float16 copies of q, k and v, its output cast back. For cards with a fused kernel
  for float16 but none for the compute dtype (bf16 on Turing and Volta, where SDPA would fall to its math kernel and
  hold the float32 scores). q and k come out of the DiT's QK-RMSNorm (both in self- and cross-attention,
  models/dit.py), so each of their elements is at most sqrt(head_dim) times the norm's largest weight: well inside
  float16. v is not normed, but attention is linear in v (each output row is a convex combination of v's rows): v is
  divided by a power of two 2^e with max |v| < 2^(e+1), computed on the device (no host sync), and the output is
  multiplied back. Powers of two scale exactly, so v's copy holds every bf16 value of v to float16's 11 significant
  bits whatever its range (values under 2^-14 of the largest become float16 subnormals: an absolute error of at
  most 2^-25 of max |v|), and what changes is the kernel's own rounding, in float16 instead of bf16.
- `exact_attention`: SDPA in float32, one head and a bounded run of queries at a time (float32 SDPA has a fused
  kernel from sm50; where it would not, the chunk bounds the scores to SCORES_PER_CALL elements).
- `Guarded`: one call site's kernel; a kernel error that is not out-of-memory (a wheel built for another
  architecture, a shape the kernel does not take) logs once, reruns that call on the fallback (SDPA as the card
  runs it) and keeps that call site on the fallback: the step goes on, nothing is lost. Out-of-memory propagates
  (the preset ladder handles it).

Every callable here takes (q, k, v, mask) as engines/attention.py's backends do.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..models.layers import sdpa

SCORES_PER_CALL = 2 ** 24    # exact_attention: queries x keys of one call (64 MiB of float32 scores at most)
HALF = torch.float16


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class HalfPrecision:
    """`inner` (a backend) run on float16 copies of q, k and v, v scaled into float16's range on the device (see
    the module docstring)."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        dtype = q.dtype
        down, up = v_scales(v)
        v16 = torch.mul(v, down, out=torch.empty_like(v, dtype=HALF))   # no copy of v in its own dtype
        q16, k16 = q.to(HALF), k.to(HALF)
        out = self.inner(q16, k16, v16, mask)
        del q16, k16, v16
        return out.to(dtype).mul_(up)

    def __eq__(self, other) -> bool:      # the planner's stand-ins compare equal when they do the same
        return isinstance(other, HalfPrecision) and self.inner == other.inner

    def __hash__(self) -> int:
        return hash((HalfPrecision, self.inner))

    def __repr__(self) -> str:
        return f"HalfPrecision({getattr(self.inner, '__name__', self.inner)!r})"


def v_scales(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^-e, 2^e) as 0-d float32 tensors on v's device, e = floor(log2(max |v|)) within [-126, 127], so that
    |v| * 2^-e < 2: one reduction, no copy of v, nothing read by the host. A NaN in v gives NaN scales (a NaN
    output, as the exact path's would be); an all-zero v, e = -126."""
    lo, hi = torch.aminmax(v)
    exponent = torch.log2(torch.maximum(hi, -lo).float()).floor_().clamp_(-126, 127)
    return torch.exp2(-exponent), torch.exp2(exponent)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """SDPA in float32 over one head and at most SCORES_PER_CALL / Sk queries at a time, written into an output
    of q's dtype. q (B, Sq, H, D), k/v (B, Sk, H, D), mask (B, Sk) bool -> (B, Sq, H, D)."""
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    rows = max(1, SCORES_PER_CALL // max(1, k.shape[1]))
    for h in range(q.shape[2]):
        kh, vh = k[:, :, h:h + 1].float(), v[:, :, h:h + 1].float()
        for start in range(0, q.shape[1], rows):
            part = slice(start, start + rows)
            out[:, part, h:h + 1] = sdpa(q[:, part, h:h + 1].float(), kh, vh, mask)
        del kh, vh
    return out


class Guarded:
    """The kernel of one call site (`site`: the attention module's name) with its fallback: after a kernel error
    that is not out-of-memory, `on_fail(site, reason)` is called once, the failed call is rerun on `fallback`, and
    every later call of this site runs `fallback`. `inner`: the kernel (what the planner and tests look through)."""

    def __init__(self, inner: Callable, fallback: Callable, site: str, on_fail: Callable[[str, str], None]):
        self.inner, self.fallback, self.site, self.on_fail = inner, fallback, site, on_fail
        self.failed: str | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        if self.failed is None:
            try:
                return self.inner(q, k, v, mask)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:   # flash-attn / SageAttention raise RuntimeError, ValueError, AssertionError...
                self.failed = first_line(e)
                self.on_fail(self.site, self.failed)
        return self.fallback(q, k, v, mask)
