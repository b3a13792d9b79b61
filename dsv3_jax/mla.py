"""Multi-head latent attention, MLA (Paper §2.1.1; docs/reference.md §2), Flax NNX port of dsv3_torch/mla.py.

Three paths share one set of weights:
- ``__call__(x, cos, sin)``: the naive training / prefill path (expanded K and V, causal).
- ``__call__(..., cache=naive)``: decoding on a cache of expanded K [B,L,H,N+R] and V [B,L,H,V].
- ``__call__(..., cache=latent)``: decoding on MLA's compressed cache, normalised c_kv [B,L,C]
  and rotated k_pe [B,L,R], with the up-projections absorbed into q and o (docs/reference.md §2.1).
  A call of many queries (a prefill: ``dsv3.flops.expand_latent_keys``) expands the cached latents to
  K/V and attends as in training instead, which then costs fewer FLOPs.

Numerics follow Hugging Face eager attention: scores = q.k in the model dtype, then times
cfg.softmax_scale (YaRN mscale^2 included) in the model dtype, masked, softmax in fp32, cast,
times v. The mask [S,T] is built from absolute positions (query p0+i sees cache entries t <= p0+i),
True = visible (the Hugging Face attention_mask convention, as dsv3_torch); with padding it is
[B,1,S,T] (``visible_mask``: causal and padded keys hidden). ``attend`` (expanded K/V) and
``attend_latent`` (absorbed) return o [B,S,H*V]; ``wo`` is applied in ``__call__``. Heads are [B,S,H,*]
here ([B,H,S,*] in dsv3_torch, the layout torch's SDPA takes).

Causal calls attend in query blocks (``dsv3.flops.causal_query_block``): where the first query's position
is a Python int (the training forward; the prefill at entry 0 of ``dsv3_jax.generate`` and of speculative
decoding) and the call has 256 queries or more, each block of queries attends to the keys up to its own
last position only (the later ones are masked for it anyway): a 256-token training step in 2 blocks of
128 (3/4 of the score and value FLOPs), a 4032-token prompt in 8 of 512 (about half). A traced first
position is one block.

Shape legend: B batch, S query time, T key time (L cache length), D model width, H heads,
Q q LoRA rank, C kv latent (kv_lora_rank), N nope head dim, R rope dim, V value head dim.
Flax kernels are [in, out] (transposed torch weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3.config import ModelConfig
from dsv3.flops import causal_query_block, expand_latent_keys
from dsv3_jax.layers import dense, linear, softmax
from dsv3_jax.norm import RMSNorm
from dsv3_jax.rope import apply_rope


def causal_mask(start_pos, S: int, T: int) -> jax.Array:
    """[S, T] bool, True where key t is visible to query start_pos + i (t <= start_pos + i).

    True = visible, the Hugging Face attention_mask convention (1 = attend). start_pos may be traced."""
    return jnp.arange(T)[None, :] <= (start_pos + jnp.arange(S))[:, None]


def visible_mask(keys: jax.Array, start_pos, S: int) -> jax.Array:
    """[B,1,S,T] bool: key t is visible to query start_pos + i iff t <= start_pos + i and key t is a real
    token (keys [B,T] bool, the attention_mask of every key position, 1 = real). start_pos may be traced.

    A query always sees itself, so a padded query's row is never all False (finite, don't-care
    output) while a real query never sees a padded key."""
    T = keys.shape[1]
    q_pos = (start_pos + jnp.arange(S))[:, None]
    k_pos = jnp.arange(T)[None, :]
    return ((k_pos <= q_pos) & (keys[:, None, :] | (k_pos == q_pos)))[:, None]


def masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """-inf where mask is False, softmax over the last axis in fp32, cast to `dtype`."""
    scores = jnp.where(mask, scores, jnp.asarray(-jnp.inf, scores.dtype))
    return softmax(scores.astype(jnp.float32)).astype(dtype)


def _scale(scores: jax.Array, scale: float) -> jax.Array:
    """scores (model dtype) times the fp32 scale, rounded once: torch's tensor * python-float rule."""
    return (scores.astype(jnp.float32) * jnp.float32(scale)).astype(scores.dtype)


class MLA(nnx.Module):
    """Attention block: wq | (wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.q_lora_rank = H, cfg.q_lora_rank
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.wq = linear(D, H * cfg.qk_head_dim, cfg, dtype, rngs)
        else:
            self.wq_a = linear(D, cfg.q_lora_rank, cfg, dtype, rngs)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype=dtype)
            self.wq_b = linear(cfg.q_lora_rank, H * cfg.qk_head_dim, cfg, dtype, rngs)
        self.wkv_a = linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg, dtype, rngs)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype=dtype)
        self.wkv_b = linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg, dtype, rngs)
        self.wo = linear(H * cfg.v_head_dim, D, cfg, dtype, rngs)

    # ----------------------------------------------------------- projections
    def query(self, x, cos, sin):
        """x [B,S,D], cos/sin [S,R/2] or [B,S,R/2] (per-row positions) -> q_nope [B,S,H,N], rotated q_pe [B,S,H,R]."""
        cfg = self.cfg
        B, S, D = x.shape
        x2 = x.reshape(B * S, D)
        q = self.wq(x2) if cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x2)))
        q = q.reshape(B, S, cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos[..., None, :], sin[..., None, :])  # cos [(B,)S,R/2] over H

    def latent(self, x, cos, sin):
        """x [B,S,D], cos/sin [S,R/2] -> normalised c_kv [B,S,C], rotated k_pe [B,S,R] (shared by all heads)."""
        kv = dense(self.wkv_a, x)
        C = self.cfg.kv_lora_rank
        return self.kv_norm(kv[..., :C]), apply_rope(kv[..., C:], cos, sin)

    def expand(self, c_kv, k_pe):
        """c_kv [B,T,C], k_pe [B,T,R] -> k [B,T,H,N+R], v [B,T,H,V]."""
        cfg = self.cfg
        B, T, _ = c_kv.shape
        H, N = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kvb = dense(self.wkv_b, c_kv).reshape(B, T, H, N + cfg.v_head_dim)
        k_nope, v = kvb[..., :N], kvb[..., N:]
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (B, T, H, cfg.qk_rope_head_dim))
        return jnp.concatenate([k_nope, k_pe], axis=-1), v

    def attend(self, q, k, v, mask, start=None):
        """q [B,S,H,N+R], k [B,T,H,N+R], v [B,T,H,V], mask [S,T] or [B,1,S,T] (True = visible) -> o [B,S,H*V].

        start: the first query's position as a Python int, where the mask is causal from it: a long call
        then attends in query blocks (module doc); None (a traced position), one block."""
        B, S = q.shape[:2]
        size = S if start is None else causal_query_block(S)
        if size >= S:
            return self._attend_block(q, k, v, mask).reshape(B, S, -1)
        blocks = []
        for a in range(0, S, size):
            b = min(a + size, S)
            t = min(start + b, k.shape[1])  # keys beyond the block's last position are masked for all of it
            blocks.append(self._attend_block(q[:, a:b], k[:, :t], v[:, :t], mask[..., a:b, :t]))
        return jnp.concatenate(blocks, axis=1).reshape(B, S, -1)

    def _attend_block(self, q, k, v, mask):
        """attend's maths on one block of queries -> o [B,S,H,V].

        p.v is computed heads-major ([B,H,S,V]) and then transposed: written straight into [B,S,H,V], XLA:CPU
        ran that product at a quarter of its speed (docs/bench/README.md, "Measured choices in the code")."""
        scores = _scale(jnp.einsum("bshd,bthd->bhst", q, k), self.scale)
        p = masked_softmax(scores, mask, q.dtype)
        return jnp.einsum("bhst,bthv->bhsv", p, v).transpose(0, 2, 1, 3)

    # --------------------------------------------------------------- forward
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, start_pos=0,
                 cache: dict | None = None, mask: jax.Array | None = None):
        """x [B,S,D] at positions start_pos.., cos/sin [S,R/2] (or [B,S,R/2], per-row positions)
        -> out [B,S,D] (no cache) or (out, cache) with a cache.

        mask: None (causal) or [B,1,S,T] bool from ``visible_mask`` (T = S without a cache, the
        cache length L with one).

        ``cache`` is one layer of `init_cache` (functional: the updated copy is returned),
        a dict with "c_kv"/"k_pe" (latent, absorbed attention) or "k"/"v" (naive). New entries
        are written at [start_pos, start_pos + S); start_pos may be traced.
        """
        S = x.shape[1]
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is None:  # training / full forward: naive path, causal
            k, v = self.expand(c_kv, k_pe)
            o = self.attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v,
                            causal_mask(0, S, S) if mask is None else mask, start=0)
            return dense(self.wo, o)
        L = next(iter(cache.values())).shape[1]
        if mask is None:
            mask = causal_mask(start_pos, S, L)  # [S,T] from absolute positions
        upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start_pos, axis=1)
        if "k" in cache:  # naive: expanded K/V
            k, v = self.expand(c_kv, k_pe)
            cache = {"k": upd(cache["k"], k), "v": upd(cache["v"], v)}
            o = self.attend(jnp.concatenate([q_nope, q_pe], axis=-1), cache["k"], cache["v"], mask)
        else:
            cache = {"c_kv": upd(cache["c_kv"], c_kv), "k_pe": upd(cache["k_pe"], k_pe)}
            if expand_latent_keys(self.cfg, S):  # a prefill: the cached latents expanded, as in training
                k, v = self.expand(cache["c_kv"], cache["k_pe"])
                o = self.attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v, mask,
                                start=start_pos if isinstance(start_pos, int) else None)
            else:
                o = self.attend_latent(q_nope, q_pe, cache["c_kv"], cache["k_pe"], mask)
        return dense(self.wo, o), cache

    def init_cache(self, batch: int, max_len: int, kind: str = "latent") -> dict:
        """One layer's empty cache: latent {c_kv [B,L,C], k_pe [B,L,R]} or naive {k [B,L,H,N+R], v [B,L,H,V]}."""
        cfg, dt = self.cfg, self.dtype
        if kind == "latent":
            return {"c_kv": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dt),
                    "k_pe": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dt)}
        if kind == "naive":
            H = cfg.num_attention_heads
            return {"k": jnp.zeros((batch, max_len, H, cfg.qk_head_dim), dt),
                    "v": jnp.zeros((batch, max_len, H, cfg.v_head_dim), dt)}
        raise ValueError(f"cache kind must be 'latent' or 'naive', got {kind!r}")

    def attend_latent(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Weight-absorbed attention on the latent cache (docs/reference.md §2.1) -> o [B,S,H*V].

        q_nope [B,S,H,N], q_pe [B,S,H,R], c_kv [B,T,C], k_pe [B,T,R], mask [S,T] or [B,1,S,T] (True = visible).
        """
        cfg = self.cfg
        B, S, H, N = q_nope.shape
        w = self.wkv_b.kernel[...].reshape(cfg.kv_lora_rank, H, N + cfg.v_head_dim)  # [C,H,N+V]
        w_uk, w_uv = w[..., :N], w[..., N:]                                          # [C,H,N], [C,H,V]
        q_lat = jnp.einsum("bshn,chn->bshc", q_nope, w_uk)
        scores = _scale(jnp.einsum("bshc,btc->bhst", q_lat, c_kv) + jnp.einsum("bshr,btr->bhst", q_pe, k_pe),
                        self.scale)
        p = masked_softmax(scores, mask, q_nope.dtype)
        o_lat = jnp.einsum("bhst,btc->bshc", p, c_kv)
        o = jnp.einsum("bshc,chv->bshv", o_lat, w_uv)
        return o.reshape(B, S, H * cfg.v_head_dim)
