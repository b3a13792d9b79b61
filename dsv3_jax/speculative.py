"""Speculative decoding with the first MTP depth as the draft: the Flax NNX model calls (dsv3.speculative).

Shape legend: B batch, S tokens fed in one call, n positions fed to the MTP depth, D model width, V vocab.

`SpeculativeSteps` holds the main latent cache, the MTP depth's own attention cache and the main hidden
state of the last call; `dsv3.speculative.speculative_loop` drives it (draft, verify, accept, commit).
Greedy decoding drafts and verifies in one compiled program (the draft stays on the device); sampling,
whose coin flips are drawn on the host, calls the draft and the verify programs in turn. Each ``nnx.jit``
function takes traced positions and compiles once per (batch, tokens per call, cache length).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

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


@nnx.jit
def _main_step(model, tokens, cache, start_pos, mask=None):
    """tokens [B,S] at start_pos (traced; mask [B,S] or None) -> (ids, logits, finite, hidden [B,S,D], cache)."""
    h, cache = model.hidden_cached(tokens, cache, start_pos, mask)
    return (*_out(dense(model.head, h)), h, cache)


@nnx.jit
def _draft_step(model, hidden, tokens, valid, cache, mtp_cache, start_pos):
    """Mark the main cache's entries start_pos.. (traced) with valid [B,n] (False: a hole), then MTP depth 1
    on (hidden [B,n,D], embed(tokens [B,n])) there -> (ids, logits, finite at each row's last valid entry,
    cache, mtp_cache)."""
    mod = model.mtp[0]
    n = tokens.shape[1]
    keys, positions = cached_keys(cache, valid, start_pos)
    cos, sin = model.rope(positions, model.dtype)
    h, mtp_cache = mod.forward_cached(hidden, model.embed(tokens), cos, sin, start_pos, mtp_cache,
                                      visible_mask(keys, start_pos, n), valid)
    last = n - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # each row's last valid entry
    h = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    cache = KVCache(cache.kind, cache.max_len, cache.layers, keys)
    return (*_out(dense(model.head, mod.norm(h))), cache, mtp_cache)


@nnx.jit
def _draft_verify_step(model, hidden, tokens, valid, mtp_cache, start_pos, pending, cache, pos):
    """Greedy draft and verify in one program: `_draft_step`'s argmax d, then `_main_step` on [pending, d]
    [B,2] at pos -> (drafts [B], ids [B,2], finite [B], hidden, cache, mtp_cache)."""
    d, _, q_finite, cache, mtp_cache = _draft_step(model, hidden, tokens, valid, cache, mtp_cache, start_pos)
    ids, _, finite, hidden, cache = _main_step(model, jnp.stack([pending, d], axis=1), cache, pos)
    return d, ids, finite & q_finite, hidden, cache, mtp_cache


class SpeculativeSteps:
    """prefill / draft / verify of `dsv3.speculative.SpeculativeSteps` on a Flax NNX DeepSeekV3.

    greedy: return argmax token ids (else fp32 logits). Caches of `cache_len` entries of kind `cache`; the
    main cache's mask (1 = real entry) also masks the MTP depth's cache, which uses the same entries."""

    def __init__(self, model, batch: int, cache_len: int, greedy: bool, cache: str = "latent"):
        self.model, self.greedy = model, greedy
        self.main_cache = model.init_cache(batch, cache_len, kind=cache)
        self.mtp_cache = model.mtp[0].block.attn.init_cache(batch, cache_len, cache)
        self.hidden = None  # the main hidden after the final norm of the last main call [B,S,D]

    def _fetch(self, ids, logits, finite):
        return np.asarray(ids if self.greedy else logits), np.asarray(finite)

    def _main(self, tokens: list[list[int]], start_pos: int, mask=None):
        self.model._check_tokens(np.asarray(tokens), start_pos, cache_len=self.main_cache.max_len)
        ids, logits, finite, self.hidden, self.main_cache = _main_step(
            self.model, jnp.asarray(tokens, jnp.int32), self.main_cache, jnp.int32(start_pos),
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

    def draft(self, tokens: list[list[int]], start_pos: int,
              valid: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Mark the main cache's entries start_pos.. with valid [B][n] (0: a hole), then MTP depth 1 on
        (kept hidden[:, :n], embed(tokens [B][n])) there -> its output at each row's last valid entry
        (ids [B] or logits [B,V]), finite [B]."""
        n = len(tokens[0])
        ids, logits, finite, self.main_cache, self.mtp_cache = _draft_step(
            self.model, self.hidden[:, :n], jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool),
            self.main_cache, self.mtp_cache, jnp.int32(start_pos))
        return self._fetch(ids, logits, finite)

    def draft_verify(self, tokens: list[list[int]], start_pos: int, valid: list[list[int]], pending: list[int],
                     pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy: draft(tokens, start_pos, valid)'s argmax d, then verify [pending, d] at pos, one compiled
        program -> (drafts [B], verified ids [B,2], finite [B] of both calls)."""
        n = len(tokens[0])
        self.model._check_tokens(np.asarray(tokens), start_pos, cache_len=self.main_cache.max_len)
        i32 = partial(jnp.asarray, dtype=jnp.int32)
        d, ids, finite, self.hidden, self.main_cache, self.mtp_cache = _draft_verify_step(
            self.model, self.hidden[:, :n], i32(tokens), jnp.asarray(valid, bool), self.mtp_cache,
            jnp.int32(start_pos), i32(pending), self.main_cache, jnp.int32(pos))
        return np.asarray(d), np.asarray(ids), np.asarray(finite)


def speculative_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                         eos: Optional[int] = None, cache: str = "latent",
                         on_token: Optional[Callable[[int, int], None]] = None, speculative: str = "mtp",
                         stats: Optional[SpeculativeStats] = None) -> list[list[int]]:
    """`generate` with the first MTP depth drafting one token per step; greedy, the same tokens as
    `generate`, sampling, the same distribution. `stats` (a SpeculativeStats) is filled in place."""
    check_generate_args(prompts, max_new_tokens, temperature, model.cfg.vocab_size, top_k, top_p, seed, eos)
    check_speculative(speculative, len(model.mtp))
    cache_len = cache_slots(prompts, max_new_tokens, model.cfg.max_position_embeddings)
    # the caches bucketed (dsv3.generation.cache_length: one compiled program for many lengths; entries
    # past the fed ones are never attended to); the loop keeps the exact length, so the tokens do not change
    steps = SpeculativeSteps(model, len(prompts), max(cache_len, min(cache_length(cache_len),
                                                                     model.cfg.max_position_embeddings)),
                             temperature == 0, cache)
    return speculative_loop(prompts, max_new_tokens, eos, on_token, steps, cache_len, temperature, top_k, top_p,
                            seed, stats)
