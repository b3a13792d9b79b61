"""RMSNorm (DeepSeek-V3 Paper §2; docs/reference.md §5 "RMSNorm").

Shape legend: B batch, T time, D model width (any trailing width here).

Pinned numerics (HF convention): normalise in fp32, cast back to the input
dtype, THEN multiply by the weight in the model dtype. Torch's ``F.rms_norm``
multiplies before the cast, which differs by up to 3e-2 in bf16.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
