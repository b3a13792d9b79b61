"""The decoder layer, Block (Paper §2; docs/reference.md §5), shared by the main model and the MTP depths.

Shape legend: B batch, T time, D model width.

Block (pre-norm):  h = x + attn(attn_norm(x));  h = h + ffn(ffn_norm(h)),
residual adds in the model dtype; ffn is a dense SwiGLU (MLP) in the first
``first_k_dense_replace`` layers and a MoE afterwards.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dsv3.config import ModelConfig
from dsv3_jax.mla import MLA
from dsv3_jax.moe import MLP, MoE
from dsv3_jax.norm import RMSNorm


class Block(nnx.Module):
    """One decoder layer: attn_norm, attn (MLA), ffn_norm, ffn (MLP or MoE)."""

    def __init__(self, cfg: ModelConfig, moe: bool, *, dtype=jnp.float32, moe_impl: str = "auto",
                 combine: str = "grouped", rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.moe = moe
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        if moe:
            self.ffn = MoE(cfg, dtype=dtype, impl=moe_impl, combine=combine, rngs=rngs)
        else:
            self.ffn = MLP(D, cfg.intermediate_size, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, start_pos=0, cache=None):
        """x [B,T,D] -> (h [B,T,D], MoEOutput or None for a dense layer, updated layer cache or None)."""
        if cache is None:
            a = self.attn(self.attn_norm(x), cos, sin)
        else:
            a, cache = self.attn(self.attn_norm(x), cos, sin, start_pos, cache)
        h = x + a
        if self.moe:
            f = self.ffn(self.ffn_norm(h))
            return h + f.out, f, cache
        return h + self.ffn(self.ffn_norm(h)), None, cache
