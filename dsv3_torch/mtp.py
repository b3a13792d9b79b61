"""Multi-token prediction module (Paper §2.2 and §2.3; docs/reference.md §6).

Shape legend: B batch, T time, D model width.

MTP depth k (shares the embedding and output head with the main model):
    x_i  = eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)])    # EMBEDDING FIRST
    h^k  = block(x)            (causal over i, RoPE at the original positions i)
    logits^k = head(norm(h^k))
The embedding comes first as in the released checkpoint (columns 0..D-1 of
eh_proj act on it), although Paper eq. 21 writes [h ; emb]. h^0 is the main
model's hidden AFTER its final norm; depth k+1 receives h^k from before norm.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3_torch.block import Block
from dsv3_torch.layers import linear
from dsv3_torch.moe import MoEOutput
from dsv3_torch.norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth: enorm, hnorm, eh_proj [D, 2D], block (a MoE Block), norm."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.eh_proj = linear(2 * D, D, dtype, device)
        self.block = Block(cfg, moe=True, dtype=dtype, device=device)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)

    def _input(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, MoEOutput]:
        """h_prev [B,T,D] (h^{k-1}), emb [B,T,D] (embed of t_{i+k}) -> (h^k before norm, MoEOutput).

        mask, valid: padding, as in Block (None: causal, every token counts)."""
        h, stats, _ = self.block(self._input(h_prev, emb), cos, sin, mask=mask, valid=valid)
        return h, stats

    def forward_cached(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       start_pos: int, cache: dict, mask: Optional[torch.Tensor] = None,
                       valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """`forward` on S new positions start_pos.. with the block's attention cache (one layer of
        ``block.attn.init_cache``, filled in place): h_prev, emb [B,S,D] -> (h^k before norm [B,S,D], cache).

        The draft step of speculative decoding; the same inputs and order as in training. mask, valid:
        padding and holes, as in Block (the [B,1,S,keys] ``visible_mask`` and the real new entries [B,S])."""
        h, _, cache = self.block(self._input(h_prev, emb), cos, sin, start_pos, cache, mask, valid)
        return h, cache
