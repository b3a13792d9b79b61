"""Layer helpers shared by the modules: the bias-free Linear and numpy conversion.

Shape legend: D_in, D_out the layer's input and output widths. torch weights are [out, in].
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import nn

from dsv3_torch import cpu_matmul


class Linear(nn.Linear):
    """A bias-free nn.Linear whose product is ``cpu_matmul.linear`` (oneDNN for fp32 on CPUs where MKL
    runs below the vector width, else F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_matmul.linear(x, self.weight)


def linear(d_in: int, d_out: int, dtype: torch.dtype = torch.float32, device=None) -> Linear:
    """Bias-free Linear, weight [d_out, d_in]; initialised N(0, initializer_range) by DeepSeekV3.reset_parameters."""
    return Linear(d_in, d_out, bias=False, dtype=dtype, device=device)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x computes in: autocast's where autocast is on for x's device, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A copy as numpy; bf16 becomes ml_dtypes.bfloat16 (same bits)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A torch copy of a numpy array; ml_dtypes.bfloat16 becomes torch.bfloat16."""
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(a.view(np.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))
