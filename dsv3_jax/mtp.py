"""Multi-token prediction module (Paper §2.2; REFERENCE §6), Flax NNX port of dsv3_torch/mtp.py.

Depth k predicts t_{i+k+1} from the previous depth's hidden h^{k-1}_i (depth 1: the main
model's hidden AFTER model.norm) and the embedding of t_{i+k}:

    x   = eh_proj(concat(enorm(embed(t_{i+k})), hnorm(h^{k-1})))      # EMBEDDING FIRST
    h^k = block(x)                                                      # a causal MoE decoder layer
    logits^k = head(norm(h^k))                                          # embed and head shared

Depth k+1 receives h^k from BEFORE ``norm``. RoPE inside uses the original positions i.

Also holds Block, the decoder layer shared by the main model and the MTP depths (as dsv3_torch).

Shape legend: B batch, T time, D model width, E routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3.config import ModelConfig
from dsv3_jax.mla import MLA, dense, linear
from dsv3_jax.moe import MLP, MoE
from dsv3_jax.norm import RMSNorm


class Block(nnx.Module):
    """Pre-norm decoder layer: h + attn(attn_norm(h)), then + ffn(ffn_norm(h)); ffn = MLP or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, *, dtype=jnp.float32, moe_impl: str = "auto",
                 combine: str = "grouped", rngs: nnx.Rngs):
        self.moe = moe
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if moe:
            self.ffn = MoE(cfg, dtype=dtype, impl=moe_impl, combine=combine, rngs=rngs)
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, start_pos=0, cache=None):
        """x [B,T,D] -> (h [B,T,D], MoEOutput or None for a dense layer, updated layer cache or None)."""
        if cache is None:
            a = self.attn(self.attn_norm(x), cos, sin)
        else:
            a, cache = self.attn(self.attn_norm(x), cos, sin, start_pos, cache)
        x = x + a
        if self.moe:
            f = self.ffn(self.ffn_norm(x))
            return x + f.out, f, cache
        return x + self.ffn(self.ffn_norm(x)), None, cache


class MTPModule(nnx.Module):
    """enorm, hnorm (RMSNorm D), eh_proj (Linear 2D -> D), block (MoE Block), norm (shared_head.norm)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, moe_impl: str = "auto",
                 combine: str = "grouped", rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.eh_proj = linear(2 * D, D, cfg, dtype, rngs)
        self.block = Block(cfg, moe=True, dtype=dtype, moe_impl=moe_impl, combine=combine, rngs=rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, h_prev: jax.Array, emb: jax.Array, cos: jax.Array, sin: jax.Array):
        """h_prev [B,T,D] (h^{k-1}), emb [B,T,D] (embed of t_{i+k}), cos/sin [T,R/2]
        -> (h^k [B,T,D] before norm, MoEOutput)."""
        x = dense(self.eh_proj, jnp.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))
        h, stats, _ = self.block(x, cos, sin)
        return h, stats
