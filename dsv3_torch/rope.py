"""Decoupled RoPE with YaRN (DeepSeek-V3 Paper §2.1, eqs. 3 and 7; docs/reference.md §3).

Shape legend: B batch, T time, H heads, R rope head dim (qk_rope_head_dim).

Only the R-dim parts q_pe (per head) and k_pe (one shared head) are rotated.
Checkpoints store each rotated pair (x[2j], x[2j+1]) interleaved; we use the
Hugging Face form, which reads the even/odd elements and writes the result
de-interleaved: out[j] = y[2j], out[R/2 + j] = y[2j+1]. q and k share the
permutation, so q.k is unchanged; only the caches hold k_pe in that order.

Pinned numerics: angles and inverse frequencies in fp32 with HF's op order;
cos/sin are multiplied by ``cfg.rope_attention_factor`` in fp32 and cast to the
model dtype BEFORE rotating, so every rotation op rounds in the model dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3.config import ModelConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rope dim index whose wavelength fits `num_rotations` times in max_pos."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [R/2] in fp32 (plain RoPE, or YaRN in HF's op order)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_scaling_type != "yarn":
        return 1.0 / pos_freqs
    low = math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_max_position_embeddings))
    high = math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra = 1.0 / pos_freqs  # extrapolation: the base frequency
    inter = 1.0 / (cfg.rope_factor * pos_freqs)  # interpolation: divided by the factor
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables [T, R/2] for absolute positions (no parameters, no buffers).

    The fp32 inverse frequencies are a plain attribute, not a buffer, so that
    ``model.to(bfloat16)`` cannot round them and state_dict stays canonical.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inv_freq = rope_inv_freq(cfg)
        self.attention_factor = float(cfg.rope_attention_factor)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        theta = positions.float()[..., None] * inv_freq  # fp32 angles
        cos = (theta.cos() * self.attention_factor).to(dtype)
        sin = (theta.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., R]; output de-interleaved (HF form).

    cos/sin [..., R/2] must broadcast against x[..., 0::2].
    """
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
