"""Small layers and helpers shared by several networks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale in that dtype (the release's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        del xf  # the float32 copy is not needed for the scaling: free it before the next allocation
        return normed * self.weight


def empty_embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding without the random init (it is loaded anyway; init on meta takes seconds in torch)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D), key mask (B, Sk) bool (True = attend) -> (B, Sq, H, D); scale 1/sqrt(D)."""
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Sk): all heads and queries
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)


def row_projector(layer: nn.Module, x: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """part(start, stop) -> layer(x)[..., start:stop] for a linear-like `layer` (weight rows = output features).

    When every tensor of the layer is per output row (nn.Linear; weight-only quantized linears with one scale per
    row), a part is computed from those rows of the weight alone, through the layer's own forward, so only that
    part of the output is ever allocated. Otherwise the full output is computed once and sliced."""
    rows = layer.weight.shape[0]
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    if not all(t.dim() >= 1 and t.shape[0] == rows for t in tensors.values()):
        full = layer(x)
        return lambda start, stop: full[..., start:stop]

    def part(start: int, stop: int) -> torch.Tensor:
        if start == 0 and stop >= rows:
            return layer(x)
        return functional_call(layer, {name: t[start:stop] for name, t in tensors.items()}, (x,))
    return part
