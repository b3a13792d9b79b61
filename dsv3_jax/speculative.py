"""Speculative decoding with the MTP depths as the draft: the Flax NNX model calls (dsv3.speculative).

Shape legend: B batch, S tokens fed in one call, n slots fed to the MTP depths, D model width, V vocab,
K MTP depths.

`SpeculativeSteps` holds the main latent cache, each MTP depth's own attention cache and the main hidden
state at every filled slot; `dsv3.speculative.speculative_loop` drives it (draft, verify, accept, commit).
Greedy decoding drafts and verifies in one compiled program (the drafts stay on the device); sampling,
whose coin flips are drawn on the host, calls each depth's draft program and the verify program in turn.
Each program is a ``jax.jit`` function of the model's ``nnx.split`` (graph, state), split once per
generation (as in dsv3_jax.generate: ``nnx.jit`` would walk the object graph in Python on every call); it
takes traced positions and compiles once per (batch, tokens per call, cache length).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3.generation import check_generate_args
from dsv3.generation import cache_length
from dsv3.speculative import SpeculativeStats, cache_slots, check_speculative, speculative_loop
from dsv3_jax.layers import dense
from dsv3_jax.mla import visible_mask
from dsv3_jax.model import KVCache, cached_keys


def _out(logits):
    """logits [B,...,V] -> (argmax ids int32, fp32 logits, finite [B]); the caller fetches the one it needs,
    so greedy and sampling share one compiled program."""
    finite = jnp.all(jnp.isfinite(logits).reshape(logits.shape[0], -1), axis=-1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits.astype(jnp.float32), finite


def _main(model, tokens, cache, start_pos, hidden, mask=None):
    """tokens [B,S] at start_pos (traced; mask [B,S] or None) -> (ids, logits, finite, hidden [B,L,D] with the
    new hidden written at start_pos.., cache)."""
    h, cache = model.hidden_cached(tokens, cache, start_pos, mask)
    hidden = jax.lax.dynamic_update_slice_in_dim(hidden, h.astype(hidden.dtype), start_pos, axis=1)
    return (*_out(dense(model.head, h)), hidden, cache)


def _draft(model, k, h_prev, tokens, valid, cache, mtp_cache, start_pos):
    """Mark the main cache's entries start_pos.. (traced) with valid [B,n] (False: a hole), then MTP depth k
    (static, 1-based) on (h_prev [B,n,D], embed(tokens [B,n])) there -> (ids, logits, finite at each row's
    last valid entry, the depth's output h [B,n,D] before its norm, cache, mtp_cache)."""
    mod = model.mtp[k - 1]
    n = tokens.shape[1]
    keys, positions = cached_keys(cache, valid, start_pos)
    cos, sin = model.rope(positions, model.dtype)
    h, mtp_cache = mod.forward_cached(h_prev, model.embed(tokens), cos, sin, start_pos, mtp_cache,
                                      visible_mask(keys, start_pos, n), valid)
    last = n - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # each row's last valid entry
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    cache = KVCache(cache.kind, cache.max_len, cache.layers, keys)
    return (*_out(dense(model.head, mod.norm(h_last))), h, cache, mtp_cache)


def _main_on(graph, state, *args, **kw):
    """`_main` on the model nnx.merge(graph, state)."""
    return _main(nnx.merge(graph, state), *args, **kw)


_main_step = jax.jit(_main_on, static_argnums=0)  # start_pos traced: one program for every verify
# the prompt at entry 0: start_pos a Python int, so a long prompt attends in causal query blocks (dsv3_jax.mla)
_prefill_step = jax.jit(_main_on, static_argnums=(0, 4))


@partial(jax.jit, static_argnums=(0, 2))
def _draft_step(graph, state, k, h_prev, tokens, valid, cache, mtp_cache, start_pos):
    """`_draft` as one program per depth; depth 1 takes the main hidden of every slot [B,L,D] and reads the
    slots start_pos.. itself (a traced start: one program for every window)."""
    model = nnx.merge(graph, state)
    if k == 1:
        h_prev = jax.lax.dynamic_slice_in_dim(h_prev, start_pos, tokens.shape[1], axis=1)
    return _draft(model, k, h_prev, tokens, valid, cache, mtp_cache, start_pos)


@partial(jax.jit, static_argnums=0)
def _draft_verify_step(graph, state, hidden, codes, valid, mtp_caches, start_pos, pending, cache, pos):
    """Greedy drafts of every depth and their verification in one program: depth k's tokens are codes[k - 1]
    [B,n] with -i standing for the argmax draft d_i of depth i < k; then `_main_step` on
    [pending, d_1 .. d_K] [B,K+1] at pos -> (drafts [B,K], ids [B,K+1], finite [B], hidden, cache, mtp_caches)."""
    model = nnx.merge(graph, state)
    d = jnp.zeros((pending.shape[0], 0), jnp.int32)
    finite, mtp_caches = jnp.ones(pending.shape, bool), list(mtp_caches)
    h = jax.lax.dynamic_slice_in_dim(hidden, start_pos, codes.shape[2], axis=1)
    for k in range(1, codes.shape[0] + 1):
        c = codes[k - 1]
        tokens = c if k == 1 else jnp.where(c >= 0, c, jnp.take_along_axis(d, jnp.clip(-c - 1, 0, k - 2), axis=1))
        ids, _, fk, h, cache, mtp_caches[k - 1] = _draft(model, k, h, tokens, valid, cache, mtp_caches[k - 1],
                                                          start_pos)
        d, finite = jnp.concatenate([d, ids[:, None]], axis=1), finite & fk
    ids, _, fv, hidden, cache = _main(model, jnp.concatenate([pending[:, None], d], axis=1), cache, pos,
                                           hidden)
    return d, ids, finite & fv, hidden, cache, mtp_caches


class SpeculativeSteps:
    """prefill / draft / verify of `dsv3.speculative.SpeculativeSteps` on a Flax NNX DeepSeekV3.

    greedy: return argmax token ids (else fp32 logits). Caches of `cache_len` entries of kind `cache`; the
    main cache's mask (1 = real entry) also masks the MTP depths' caches, which use the same entries."""

    def __init__(self, model, batch: int, cache_len: int, greedy: bool, cache: str = "latent"):
        self.model, self.greedy = model, greedy
        self.graph, self.state = nnx.split(model)
        self.depths = len(model.mtp)
        self.main_cache = model.init_cache(batch, cache_len, kind=cache)
        self.mtp_caches = [mod.block.attn.init_cache(batch, cache_len, cache) for mod in model.mtp]
        # the main hidden after the final norm at every slot a main call filled [B, cache_len, D]
        self.hidden = jnp.zeros((batch, cache_len, model.cfg.hidden_size), model.dtype)
        self.mtp_hidden = None  # the last draft call's depth output (before its norm) [B,n,D]

    def _fetch(self, ids, logits, finite):
        return np.asarray(ids if self.greedy else logits), np.asarray(finite)

    def _main(self, tokens: list[list[int]], start_pos: int, mask=None):
        self.model._check_tokens(np.asarray(tokens), start_pos, cache_len=self.main_cache.max_len)
        step, at = (_prefill_step, 0) if start_pos == 0 else (_main_step, jnp.int32(start_pos))
        ids, logits, finite, self.hidden, self.main_cache = step(
            self.graph, self.state, jnp.asarray(tokens, jnp.int32), self.main_cache, at, self.hidden,
            None if mask is None else jnp.asarray(mask, bool))
        return self._fetch(ids, logits, finite)

    def prefill(self, tokens: list[list[int]], mask: Optional[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][P] (left-padded; mask 1 = real, or None) at 0.. -> the main model's output at P - 1
        (ids [B] or logits [B,V]), finite [B]."""
        out, finite = self._main(tokens, 0, mask)
        return out[:, -1], finite

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][S] at start_pos.. -> the main model's outputs (ids [B,S] or logits [B,S,V]), finite [B]."""
        return self._main(tokens, start_pos)

    def draft(self, k: int, tokens: list[list[int]], start_pos: int,
              valid: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Depth k (1-based) on the slots start_pos.. : mark the main cache's entries there with valid [B][n]
        (0: a hole), then (previous hidden there, embed(tokens [B][n])) through the depth -> its output at
        each row's last valid entry (ids [B] or logits [B,V]), finite [B]. The previous hidden: the main
        model's (k = 1) or the last draft call's (depth k - 1 on the same slots)."""
        self.model._check_tokens(np.asarray(tokens), start_pos, cache_len=self.main_cache.max_len)
        ids, logits, finite, self.mtp_hidden, self.main_cache, self.mtp_caches[k - 1] = _draft_step(
            self.graph, self.state, k, self.hidden if k == 1 else self.mtp_hidden, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(valid, bool), self.main_cache, self.mtp_caches[k - 1], jnp.int32(start_pos))
        return self._fetch(ids, logits, finite)

    def draft_verify(self, codes: list[list[list[int]]], start_pos: int, valid: list[list[int]],
                     pending: list[int], pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy: every depth's draft (codes[k - 1], -i: the argmax draft d_i), then verify
        [pending, d_1 .. d_K] at pos, one compiled program -> (drafts [B,K], verified ids [B,K+1], finite [B]
        of every call)."""
        c = np.maximum(np.asarray(codes), 0)  # the drafts' codes as token 0
        self.model._check_tokens(c.reshape(-1, c.shape[-1]), start_pos, cache_len=self.main_cache.max_len)
        i32 = partial(jnp.asarray, dtype=jnp.int32)
        d, ids, finite, self.hidden, self.main_cache, self.mtp_caches = _draft_verify_step(
            self.graph, self.state, self.hidden, i32(codes), jnp.asarray(valid, bool), self.mtp_caches, jnp.int32(start_pos),
            i32(pending), self.main_cache, jnp.int32(pos))
        return np.asarray(d), np.asarray(ids), np.asarray(finite)


def speculative_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                         eos: Optional[int] = None, cache: str = "latent",
                         on_token: Optional[Callable[[int, int], None]] = None, speculative: str = "mtp",
                         stats: Optional[SpeculativeStats] = None) -> list[list[int]]:
    """`generate` with the model's MTP depths drafting a chain of tokens per step; greedy, the same tokens as
    `generate`, sampling, the same distribution. `stats` (a SpeculativeStats) is filled in place."""
    check_generate_args(prompts, max_new_tokens, temperature, model.cfg.vocab_size, top_k, top_p, seed, eos)
    check_speculative(speculative, len(model.mtp))
    cache_len = cache_slots(prompts, max_new_tokens, model.cfg.max_position_embeddings, len(model.mtp))
    # the caches bucketed (dsv3.generation.cache_length: one compiled program for many lengths; entries
    # past the fed ones are never attended to); the loop keeps the exact length, so the tokens do not change
    steps = SpeculativeSteps(model, len(prompts), max(cache_len, min(cache_length(cache_len),
                                                                     model.cfg.max_position_embeddings)),
                             temperature == 0, cache)
    return speculative_loop(prompts, max_new_tokens, eos, on_token, steps, cache_len, temperature, top_k, top_p,
                            seed, stats)
