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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3.generation import check_generate_args
from dsv3.speculative import SpeculativeStats, check_speculative, speculative_loop
from dsv3.generation import cache_length
from dsv3_jax.layers import dense


def _out(logits):
    """logits [B,...,V] -> (argmax ids int32, fp32 logits, finite [B]); the caller fetches the one it needs,
    so greedy and sampling share one compiled program."""
    finite = jnp.all(jnp.isfinite(logits).reshape(logits.shape[0], -1), axis=-1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits.astype(jnp.float32), finite


@nnx.jit
def _main_step(model, tokens, cache, start_pos):
    """tokens [B,S] at start_pos (traced) -> (ids, logits, finite, hidden [B,S,D], cache)."""
    h, cache = model.hidden_cached(tokens, cache, start_pos)
    return (*_out(dense(model.head, h)), h, cache)


@nnx.jit
def _draft_step(model, hidden, tokens, mtp_cache, start_pos):
    """MTP depth 1 on (hidden [B,n,D], embed(tokens [B,n])) at start_pos (traced) -> (ids, logits, finite at
    the last position, mtp_cache)."""
    mod = model.mtp[0]
    n = tokens.shape[1]
    cos, sin = model.rope(start_pos + jnp.arange(n), model.dtype)
    h, mtp_cache = mod.forward_cached(hidden, model.embed(tokens), cos, sin, start_pos, mtp_cache)
    return (*_out(dense(model.head, mod.norm(h[:, -1]))), mtp_cache)


@nnx.jit
def _draft_verify_step(model, hidden, tokens, mtp_cache, start_pos, pending, fixed, cache, pos):
    """Greedy draft and verify in one program: `_draft_step`'s argmax (or fixed [B] where >= 0), then
    `_main_step` on [pending, draft] [B,2] at pos -> (drafts [B], ids [B,2], finite [B], hidden, cache,
    mtp_cache)."""
    q, _, q_finite, mtp_cache = _draft_step(model, hidden, tokens, mtp_cache, start_pos)
    d = jnp.where(fixed >= 0, fixed, q)
    ids, _, finite, hidden, cache = _main_step(model, jnp.stack([pending, d], axis=1), cache, pos)
    return d, ids, finite & q_finite, hidden, cache, mtp_cache


class SpeculativeSteps:
    """prefill / draft / verify of `dsv3.speculative.SpeculativeSteps` on a Flax NNX DeepSeekV3.

    greedy: return argmax token ids (else fp32 logits). Caches of `cache_len` positions of kind `cache`."""

    def __init__(self, model, batch: int, cache_len: int, greedy: bool, cache: str = "latent"):
        self.model, self.greedy = model, greedy
        self.main_cache = model.init_cache(batch, cache_len, kind=cache)
        self.mtp_cache = model.mtp[0].block.attn.init_cache(batch, cache_len, cache)
        self.hidden = None  # the main hidden after the final norm of the last main call [B,S,D]

    def _main(self, tokens: list[list[int]], start_pos: int):
        self.model._check_tokens(np.asarray(tokens), start_pos, cache_len=self.main_cache.max_len)
        ids, logits, finite, self.hidden, self.main_cache = _main_step(
            self.model, jnp.asarray(tokens, jnp.int32), self.main_cache, jnp.int32(start_pos))
        return np.asarray(ids if self.greedy else logits), np.asarray(finite)

    def prefill(self, tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][P] at 0.. -> the main model's output at P - 1 (ids [B] or logits [B,V]), finite [B]."""
        out, finite = self._main(tokens, 0)
        return out[:, -1], finite

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][S] at start_pos.. -> the main model's outputs (ids [B,S] or logits [B,S,V]), finite [B]."""
        return self._main(tokens, start_pos)

    def draft(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """MTP depth 1 on (kept hidden[:, :n], embed(tokens [B][n])) at start_pos.. -> its output at the
        last position (ids [B] or logits [B,V]), finite [B]."""
        n = len(tokens[0])
        ids, logits, finite, self.mtp_cache = _draft_step(self.model, self.hidden[:, :n],
                                                          jnp.asarray(tokens, jnp.int32), self.mtp_cache,
                                                          jnp.int32(start_pos))
        return np.asarray(ids if self.greedy else logits), np.asarray(finite)

    def draft_verify(self, tokens: list[list[int]], start_pos: int, pending: list[int], fixed: list[int],
                     pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy: draft at start_pos.. (its argmax, or fixed[b] where fixed[b] >= 0), then verify [pending, draft]
        at pos, one compiled program -> (drafts [B], verified ids [B,2], finite [B] of both calls)."""
        n = len(tokens[0])
        self.model._check_tokens(np.asarray(tokens), start_pos, cache_len=self.main_cache.max_len)
        i32 = partial(jnp.asarray, dtype=jnp.int32)
        d, ids, finite, self.hidden, self.main_cache, self.mtp_cache = _draft_verify_step(
            self.model, self.hidden[:, :n], i32(tokens), self.mtp_cache, jnp.int32(start_pos), i32(pending),
            i32(fixed), self.main_cache, jnp.int32(pos))
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
    cache_len = max(map(len, prompts)) + max_new_tokens
    # the caches bucketed (dsv3.generation.cache_length: one compiled program for many lengths; entries
    # past the fed ones are never attended to); the loop keeps the exact length, so the tokens do not change
    steps = SpeculativeSteps(model, len(prompts), max(cache_len, min(cache_length(cache_len),
                                                                     model.cfg.max_position_embeddings)),
                             temperature == 0, cache)
    return speculative_loop(prompts, max_new_tokens, eos, on_token, steps, cache_len, temperature, top_k, top_p,
                            seed, stats)
