"""Multi-head latent attention, MLA (DeepSeek-V3 Paper §2.1.1; docs/reference.md §2, §2.1).

Shape legend: B batch, S query length, T key length (cache), D model width,
H heads, C kv latent (kv_lora_rank), R rope head dim, N nope head dim
(qk_nope_head_dim), V value head dim (v_head_dim).

Three ways to attend, all the same function of the weights:

* training / full forward (``cache=None``): keys and values expanded per
  head, K = [k_nope ; k_pe] [B,H,T,N+R], V [B,H,T,V] (docs/reference.md §2 "Forward");
* decode on a ``naive`` cache: the same expanded K/V, kept per token;
* decode on a ``latent`` cache: only the normalised c_kv [B,T,C] and the
  rotated k_pe [B,T,R] are kept and the up-projection wkv_b is absorbed into
  the query and the output (docs/reference.md §2.1):
      q_lat = q_nope W_UK;   score = (q_lat.c_kv + q_pe.k_pe) * scale
      o     = W_UV (sum_t p_t c_kv_t)

A cached call of many queries (a prefill: ``dsv3.flops.expand_latent_keys``, from 65 queries at
peer-small's head shapes) expands the cached latents to K/V and attends as in training (torch's fused
kernel in fp32), which then costs fewer FLOPs than absorbing; decode steps stay absorbed.

Tensor layout: q/k/v are [B,H,S,*] here (the layout torch's SDPA takes), [B,S,H,*] in
dsv3_jax. Masks are bool, True = visible (the Hugging Face attention_mask convention): [S,T]
(causal, shared by the batch) or [B,1,S,T] (per row, ``visible_mask``: causal and padding).

Pinned numerics (docs/reference.md §9.2.3): scores = q.k^T in the model dtype, THEN
multiplied by the scale (not folded into q); masked with -inf from absolute
positions; softmax in fp32 and cast back before p.v. The softmax scale is
``cfg.softmax_scale`` = (N+R)^-0.5 * mscale^2 under YaRN.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.flops import causal_query_block, expand_latent_keys
from dsv3_torch.layers import compute_dtype, linear
from dsv3_torch.norm import RMSNorm
from dsv3_torch.rope import apply_rope


def causal_mask(start_pos: int, S: int, T: int, device=None) -> torch.Tensor:
    """[S, T] bool, True where key t is visible to query start_pos + i (t <= start_pos + i).

    True = visible, the Hugging Face attention_mask convention (1 = attend)."""
    q_pos = torch.arange(start_pos, start_pos + S, device=device)
    k_pos = torch.arange(T, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def visible_mask(keys: torch.Tensor, start_pos: int, S: int) -> torch.Tensor:
    """[B,1,S,T] bool: key t is visible to query start_pos + i iff t <= start_pos + i and key t is a real
    token (keys [B,T] bool, the attention_mask of every key position, 1 = real).

    A query always sees itself, so a padded query's row is never all False (finite, don't-care
    output) while a real query never sees a padded key."""
    T = keys.shape[1]
    q_pos = torch.arange(start_pos, start_pos + S, device=keys.device)[:, None]
    k_pos = torch.arange(T, device=keys.device)[None, :]
    own = k_pos == q_pos
    return ((k_pos <= q_pos) & (keys[:, None, :] | own))[:, None]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-inf where mask is False, softmax over the last axis in fp32, cast to `dtype`.

    The -inf is added (a 0 / -inf bias of the mask's own shape, in the scores' dtype) rather than filled
    in: for finite scores the same values, and a backward that passes the gradient through where a fill
    masks it again (the softmax's gradient is already 0 where its output is). torch's CPU masked_fill with
    a broadcast mask is slow: a [8, 8, 128, 256] block's forward + backward 7.3 ms against 3.0 in fp32,
    7.2 against 4.6 in bf16, outputs and gradients bit-identical (docs/bench/README.md)."""
    bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~mask, float("-inf"))
    return F.softmax(scores + bias, dim=-1, dtype=torch.float32).to(dtype)


# The most score entries (B*H*S*T, 256 MiB in fp32) an fp32 call attends to by the explicit matmuls under
# torch.compile (MLA._attend_window); longer windows keep the fused kernel, which keeps no probabilities.
COMPILED_EXPLICIT_SCORES = 1 << 26


class MLA(nn.Module):
    """Attention block: wq | (wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.q_lora_rank = H, cfg.q_lora_rank
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.wq = linear(D, H * self.qk_dim, dtype, device)
        else:
            self.wq_a = linear(D, cfg.q_lora_rank, dtype, device)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, device)
            self.wq_b = linear(cfg.q_lora_rank, H * self.qk_dim, dtype, device)
        self.wkv_a = linear(D, self.kv_lora_rank + self.rope_dim, dtype, device)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps, dtype, device)
        self.wkv_b = linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), dtype, device)
        self.wo = linear(H * self.v_dim, D, dtype, device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.dtype = self.wo.weight.dtype  # model.to(dtype): follow the weights
        return self

    # ------------------------------------------------------------ projections
    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,S,D] -> q_nope [B,H,S,N], rotated q_pe [B,H,S,R] (HF layout)."""
        B, S, _ = x.shape
        if cos.dim() == 3:  # per-row positions [B,S,R/2]: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, self.n_heads, self.qk_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,S,D] -> normalised c_kv [B,S,C], rotated shared k_pe [B,S,R]."""
        c_kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_pe, cos, sin)

    def expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Latents [B,T,C], [B,T,R] -> K [B,H,T,N+R], V [B,H,T,V] (k_pe shared by all heads)."""
        B, T, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(B, T, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope_dim, self.v_dim], dim=-1)
        k_pe = k_pe[:, None].expand(B, self.n_heads, T, self.rope_dim)
        return torch.cat([k_nope, k_pe], dim=-1), v

    # -------------------------------------------------------------- attention
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """q [B,H,S,N+R], k [B,H,T,N+R], v [B,H,T,V], mask [S,T] or [B,1,S,T] (True = visible) -> o [B,S,H*V]."""
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale  # round q.k, then scale
        p = masked_softmax(scores, mask, q.dtype)
        o = torch.matmul(p, v)  # [B,H,S,V]
        B, H, S, V = o.shape
        return o.transpose(1, 2).reshape(B, S, H * V)

    def _attend_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention by torch's fused kernel -> o [B,S,H*V].

        mask: None (causal over the whole window, S == T) or [S,T] / [B,1,S,T] bool (True = visible,
        ``causal_mask`` / ``visible_mask``).

        Private: a torch-only fast path of ``attend`` for the fp32 training forward and prefill.
        fp32 only: the same function as attend with the explicit scale,
        rounded differently (the scale is applied inside the kernel and the
        softmax is computed blockwise), ~1e-7 relative apart. bf16 keeps the
        explicit path, whose rounding is pinned to HF eager bit for bit.
        torch's CPU flash kernel needs equal q/k and v head dims (192 vs 128 in
        V3), else SDPA falls back to its unfused math path: the smaller side is
        zero-padded (zero value columns give zero output columns, cut off;
        zero q/k columns add exact zeros to q.k). Padded flash beats both the
        explicit path and the unpadded math path (figures: docs/bench/README.md, "Measured choices in the code").
        """
        dq, dv = q.shape[-1], v.shape[-1]
        if dv < dq:
            v = F.pad(v, (0, dq - dv))
        elif dq < dv:
            q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        o = o[..., :dv]  # [B,H,S,V]
        B, H, S, V = o.shape
        return o.transpose(1, 2).reshape(B, S, H * V)

    def attend_latent(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Weight-absorbed attention on latents (docs/reference.md §2.1) -> o [B,S,H*V].

        q_nope [B,H,S,N], q_pe [B,H,S,R], c_kv [B,T,C], k_pe [B,T,R], mask [S,T] or [B,1,S,T] (True = visible).
        """
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # [H,N,C], [H,V,C]
        q_lat = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk)
        scores = (torch.einsum("bhsc,btc->bhst", q_lat, c_kv)
                  + torch.einsum("bhsr,btr->bhst", q_pe, k_pe)) * self.scale
        p = masked_softmax(scores, mask, q_nope.dtype)
        o_lat = torch.einsum("bhst,btc->bhsc", p, c_kv)
        o = torch.einsum("bhsc,hvc->bshv", o_lat, w_uv)
        B, S = o.shape[:2]
        return o.reshape(B, S, -1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start_pos: int = 0, cache: Optional[dict] = None, mask: Optional[torch.Tensor] = None):
        """x [B,S,D] at positions start_pos.. -> out [B,S,D] (no cache) or (out, cache) with a cache.

        cos/sin [S, R/2] (shared by the batch) or [B, S, R/2] (per-row positions, padding).
        mask: None (causal) or [B,1,S,T] bool from ``visible_mask`` (T = S without a cache,
        start_pos + S with one). `cache` is one layer of a KVCache (`init_cache`): a dict
        with "c_kv"/"k_pe" (latent) or "k"/"v" (naive), written in place at [start_pos, start_pos + S)
        and returned; attention then covers [0, start_pos + S).
        """
        B, S, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        end = start_pos + S
        if cache is None:
            if start_pos != 0:
                raise ValueError("start_pos > 0 needs a cache")
            k, v = self.expand(c_kv, k_pe)
            return self.wo(self._attend_window(torch.cat([q_nope, q_pe], dim=-1), k, v, mask, start_pos))
        prefill = expand_latent_keys(self.cfg, S)  # as many queries as make expanded keys the cheaper path
        if "c_kv" in cache:
            cache["c_kv"][:, start_pos:end] = c_kv
            cache["k_pe"][:, start_pos:end] = k_pe
            if not prefill:
                o = self.attend_latent(q_nope, q_pe, cache["c_kv"][:, :end], cache["k_pe"][:, :end],
                                       causal_mask(start_pos, S, end, x.device) if mask is None else mask)
                return self.wo(o), cache
            k_all, v_all = self.expand(cache["c_kv"][:, :end], cache["k_pe"][:, :end])
        else:
            k, v = self.expand(c_kv, k_pe)  # [B,H,S,*]
            cache["k"][:, start_pos:end] = k.transpose(1, 2)
            cache["v"][:, start_pos:end] = v.transpose(1, 2)
            k_all, v_all = cache["k"][:, :end].transpose(1, 2), cache["v"][:, :end].transpose(1, 2)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if prefill:
            return self.wo(self._attend_window(q, k_all, v_all, mask, start_pos)), cache
        return self.wo(self.attend(q, k_all, v_all, causal_mask(start_pos, S, end, x.device) if mask is None
                                   else mask)), cache

    def _attend_window(self, q, k, v, mask, start_pos: int) -> torch.Tensor:
        """The training forward's attention of the S queries at start_pos.. on the T = start_pos + S keys
        -> o [B,S,H*V]: fp32 by torch's fused kernel (``_attend_sdpa``), bf16 by ``attend``, also under bf16
        autocast, where the CPU fused kernel is slower than the explicit bf16 matmuls (docs/bench/README.md,
        "bf16"). Under torch.compile fp32 also takes ``attend`` where the call's scores are at most
        ``COMPILED_EXPLICIT_SCORES`` entries: Inductor fuses the scale, mask and softmax and their backward
        around the matmuls, a faster step than the fused kernel's (docs/bench/README.md, "Measured choices
        in the code"), and the probabilities it keeps for the backward stay small. mask None: causal.

        ``attend`` runs in causal query blocks (``dsv3.flops.causal_query_block``), each block on the keys
        up to its own last position, which the later ones are masked for anyway: the same output (bit for bit
        in the tests), with fewer score and value FLOPs (the fused kernel skips the masked blocks itself)."""
        B, H, S, T = *q.shape[:3], k.shape[2]
        explicit = torch.compiler.is_compiling() and B * H * S * T <= COMPILED_EXPLICIT_SCORES
        if compute_dtype(q) == torch.float32 and not explicit:
            return self._attend_sdpa(q, k, v, causal_mask(start_pos, S, T, q.device) if mask is None and start_pos
                                     else mask)
        mask = causal_mask(start_pos, S, T, q.device) if mask is None else mask
        size = causal_query_block(S)
        if size >= S:
            return self.attend(q, k, v, mask)
        return torch.cat([self.attend(q[:, :, a:a + size], k[:, :, :start_pos + a + size],
                                      v[:, :, :start_pos + a + size], mask[..., a:a + size, :start_pos + a + size])
                          for a in range(0, S, size)], dim=1)

    def init_cache(self, batch: int, max_len: int, kind: str = "latent") -> dict:
        """One layer's empty cache: latent {c_kv [B,L,C], k_pe [B,L,R]} or naive {k [B,L,H,N+R], v [B,L,H,V]}."""
        kw = dict(dtype=self.wo.weight.dtype, device=self.wo.weight.device)
        if kind == "latent":
            return {"c_kv": torch.zeros(batch, max_len, self.kv_lora_rank, **kw),
                    "k_pe": torch.zeros(batch, max_len, self.rope_dim, **kw)}
        if kind == "naive":
            return {"k": torch.zeros(batch, max_len, self.n_heads, self.qk_dim, **kw),
                    "v": torch.zeros(batch, max_len, self.n_heads, self.v_dim, **kw)}
        raise ValueError(f"cache kind must be 'latent' or 'naive', got {kind!r}")
