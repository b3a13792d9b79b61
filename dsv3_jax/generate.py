"""Autoregressive generation on the MLA cache (docs/reference.md §2.1 decoding; docs/API.md), Flax NNX port.

Shape legend: B batch (prompts), S tokens fed in one call, V vocab.

One prefill of every prompt LEFT-padded to the longest (its attention_mask kept in the cache:
padded entries hidden, per-row positions), then one token per step (``dsv3.generation.decode_loop``).
The default cache is the compressed latent with weight-absorbed
attention; ``cache="naive"`` keeps expanded K/V. The decode step (forward + sampling) is one
``nnx.jit`` function with a traced position: it compiles once per (batch, cache length, sampling
settings), not once per token.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3.generation import check_generate_args, check_logits_finite, check_sampling_args, decode_loop


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_k: Optional[int],
                top_p: Optional[float]) -> jax.Array:
    """logits [B, V] -> token ids [B] int32: greedy when temperature == 0, else top-k / top-p sampling."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # drop a token once the mass BEFORE it already reaches top_p (the first always stays)
        drop = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
        sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
        logits = jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(nnx.jit, static_argnames=("temperature", "top_k", "top_p"))
def _decode(model, tokens, cache, start_pos, key, temperature, top_k, top_p, attention_mask=None):
    """Feed tokens [B, S] at start_pos (traced); sample from the last position.

    -> (next [B], finite [B]: whether each row's logits were all finite, cache)."""
    logits, cache = model.forward_cached(tokens, cache, start_pos, attention_mask)
    last = logits[:, -1]
    finite = jnp.all(jnp.isfinite(last), axis=-1)
    return sample_next(last, key, temperature, top_k, top_p), finite, cache


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             eos: Optional[int] = None, cache: str = "latent",
             on_token: Optional[Callable[[int, int], None]] = None, speculative: Optional[str] = None,
             stats=None) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept). on_token(row, token) streams them.

    speculative="mtp": the first MTP depth drafts the next-next token and the model verifies it
    (dsv3_jax.speculative; greedy gives the same tokens, sampling the same distribution); `stats`, a
    dsv3.speculative.SpeculativeStats, is then filled in place."""
    if speculative is not None:
        from dsv3_jax.speculative import speculative_generate

        return speculative_generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, cache,
                                    on_token, speculative, stats)
    check_generate_args(prompts, max_new_tokens, temperature, model.cfg.vocab_size, top_k, top_p, seed, eos)
    kv = model.init_cache(len(prompts), max(map(len, prompts)) + max_new_tokens, kind=cache)
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
    key = jax.random.key(seed)

    def step(tokens: list[list[int]], pos: int, mask: Optional[list[list[int]]]) -> list[int]:
        nonlocal kv, key
        key, sub = jax.random.split(key)
        attention_mask = None if mask is None else jnp.asarray(mask, jnp.int32)
        sampled, finite, kv = _decode(model, jnp.asarray(tokens, jnp.int32), kv, jnp.int32(pos), sub,
                                      attention_mask=attention_mask, **sampling)
        check_logits_finite(np.asarray(finite).tolist(), pos + len(tokens[0]) - 1)
        return np.asarray(sampled).tolist()

    return decode_loop(prompts, max_new_tokens, eos, on_token, step)
