"""The decoder layer, Block (Paper §2; docs/reference.md §5), shared by the main model and the MTP depths.

Shape legend: B batch, T time, D model width.

Block (pre-norm):  h = x + attn(attn_norm(x));  h = h + ffn(ffn_norm(h)),
residual adds in the model dtype; ffn is a dense SwiGLU (MLP) in the first
``first_k_dense_replace`` layers and a MoE afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3_torch.mla import MLA
from dsv3_torch.moe import MLP, MoE, MoEOutput
from dsv3_torch.norm import RMSNorm


class Block(nn.Module):
    """One decoder layer: attn_norm, attn (MLA), ffn_norm, ffn (MLP or MoE)."""

    def __init__(self, cfg: ModelConfig, moe: bool, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        D = cfg.hidden_size
        self.moe = moe
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.attn = MLA(cfg, dtype, device)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.ffn = MoE(cfg, dtype, device) if moe else MLP(D, cfg.intermediate_size, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                cache: Optional[dict] = None) -> tuple[torch.Tensor, Optional[MoEOutput], Optional[dict]]:
        """x [B,T,D] -> (h [B,T,D], MoEOutput or None for a dense layer, the layer cache or None)."""
        if cache is None:
            a = self.attn(self.attn_norm(x), cos, sin)
        else:
            a, cache = self.attn(self.attn_norm(x), cos, sin, start_pos, cache)
        h = x + a
        if self.moe:
            f = self.ffn(self.ffn_norm(h))
            return h + f.out, f, cache
        return h + self.ffn(self.ffn_norm(h)), None, cache
