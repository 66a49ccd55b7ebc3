"""Small layers shared by several networks."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale in that dtype (the release's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def empty_embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding without the random init (it is loaded anyway; init on meta takes seconds in torch)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
