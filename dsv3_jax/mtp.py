"""Multi-token prediction module (Paper §2.2; docs/reference.md §6), Flax NNX port of dsv3_torch/mtp.py.

Depth k predicts t_{i+k+1} from the previous depth's hidden h^{k-1}_i (depth 1: the main
model's hidden AFTER model.norm) and the embedding of t_{i+k}:

    x   = eh_proj(concat(enorm(embed(t_{i+k})), hnorm(h^{k-1})))      # EMBEDDING FIRST
    h^k = block(x)                                                      # a causal MoE decoder layer
    logits^k = head(norm(h^k))                                          # embed and head shared

Depth k+1 receives h^k from BEFORE ``norm``. RoPE inside uses the original positions i.

Shape legend: B batch, T time, D model width, E routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3.config import ModelConfig
from dsv3_jax.block import Block
from dsv3_jax.layers import dense, linear
from dsv3_jax.norm import RMSNorm


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

    def __call__(self, h_prev: jax.Array, emb: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | None = None, valid: jax.Array | None = None):
        """h_prev [B,T,D] (h^{k-1}), emb [B,T,D] (embed of t_{i+k}), cos/sin [T,R/2] (or [B,T,R/2])
        -> (h^k [B,T,D] before norm, MoEOutput). mask, valid: padding, as in Block."""
        h, stats, _ = self.block(self._input(h_prev, emb), cos, sin, mask=mask, valid=valid)
        return h, stats

    def _input(self, h_prev, emb):
        return dense(self.eh_proj, jnp.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))

    def forward_cached(self, h_prev: jax.Array, emb: jax.Array, cos: jax.Array, sin: jax.Array, start_pos,
                       cache: dict, mask: jax.Array | None = None, valid: jax.Array | None = None):
        """`__call__` on S new positions start_pos.. with the block's attention cache (one layer of
        ``block.attn.init_cache``; the updated copy is returned): h_prev, emb [B,S,D] ->
        (h^k before norm [B,S,D], cache). start_pos may be traced.

        The draft step of speculative decoding; the same inputs and order as in training. mask, valid:
        padding and holes, as in Block (the [B,1,S,keys] ``visible_mask`` and the real new entries [B,S])."""
        h, _, cache = self.block(self._input(h_prev, emb), cos, sin, start_pos, cache, mask, valid)
        return h, cache
