"""Autoregressive generation on the MLA cache (docs/reference.md §2.1 decoding; docs/API.md), Flax NNX port.

Shape legend: B batch (prompts), S tokens fed in one call, V vocab.

One prefill of every prompt LEFT-padded to the longest (its attention_mask kept in the cache:
padded entries hidden, per-row positions), then one token per step (``dsv3.generation.decode_loop``).
The default cache is the compressed latent with weight-absorbed
attention; ``cache="naive"`` keeps expanded K/V. The decode step (forward + sampling) is one
``jax.jit`` function with a traced position and traced sampling settings: it compiles once per
(batch, fed length, cache length), not once per token or per setting. It takes the model as
``nnx.split``'s (graph, state), split once per ``generate`` call: ``nnx.jit`` would walk the model's
object graph in Python on every call (11.6 ms a call on the small preset, against 0.1 ms for a jitted
function of the split state; the decode step reads the model and changes nothing in it).

Shapes are bucketed so that one compiled program serves many calls: the prefill is left-padded
further (masked entries, as for a shorter prompt in the batch) to ``prefill_length`` and the cache
is ``cache_length`` long (entries past the fed ones are never attended to). A row's tokens do not
depend on the buckets: its real tokens keep their positions and the padded entries are hidden.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3.generation import (PAD_ID, cache_length, check_generate_args, check_logits_finite, check_sampling_args,
                             decode_loop, prefill_length)


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_k: Optional[int],
                top_p: Optional[float]) -> jax.Array:
    """logits [B, V] -> token ids [B] int32: greedy when temperature == 0, else top-k / top-p sampling."""
    check_sampling_args(temperature, top_k, top_p)
    return _sample(logits, key, *_settings(temperature, top_k, top_p))


def _settings(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> tuple[jax.Array, ...]:
    """The sampling settings as arrays (0 for "no top-k cut", 1 for "no top-p cut"): traced, not static,
    so one compiled decode step serves every setting."""
    return (jnp.float32(temperature), jnp.int32(0 if top_k is None else top_k),
            jnp.float32(1.0 if top_p is None else top_p))


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> jax.Array:
    """sample_next on traced settings: the same tokens (each filter applied where it is asked for)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)  # descending, as top_k's k-th value and the nucleus need
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    kth = jnp.take(sorted_logits, jnp.clip(top_k, 1, V) - 1, axis=-1)[:, None]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    sorted_logits = jnp.where((top_k > 0) & (sorted_logits < kth), -jnp.inf, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # drop a token once the mass BEFORE it already reaches top_p (the first always stays)
    drop = (top_p < 1.0) & ((jnp.cumsum(probs, axis=-1) - probs) >= top_p)
    logits = jnp.where(top_p < 1.0,
                       jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], order].set(
                           jnp.where(drop, -jnp.inf, sorted_logits)),
                       logits)
    sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)


def _feed_and_sample(graph, state, tokens, cache, start_pos, key, temperature, top_k, top_p, attention_mask=None):
    """Feed tokens [B, S] at start_pos to the model nnx.merge(graph, state); sample from the last
    position (settings traced: _settings).

    -> (next [B], finite [B]: whether each row's logits were all finite, cache)."""
    logits, cache = nnx.merge(graph, state).forward_cached(tokens, cache, start_pos, attention_mask)
    last = logits[:, -1]
    finite = jnp.all(jnp.isfinite(last), axis=-1)
    return _sample(last, key, temperature, top_k, top_p), finite, cache


# the steps: start_pos traced (one program for every position)
_decode = jax.jit(_feed_and_sample, static_argnums=0)
# the prompt at entry 0: start_pos a Python int, so a long prompt attends in causal query blocks (dsv3_jax.mla)
_prefill = jax.jit(_feed_and_sample, static_argnums=(0, 4))


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             eos: Optional[int] = None, cache: str = "latent",
             on_token: Optional[Callable[[int, int], None]] = None, speculative: Optional[str] = None,
             stats=None) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept). on_token(row, token) streams them.

    speculative="mtp": the MTP depths draft the next tokens (depth k the k-th after the pending one, chained)
    and the model verifies them (dsv3_jax.speculative; greedy gives the same tokens, sampling the same distribution); `stats`, a
    dsv3.speculative.SpeculativeStats, is then filled in place."""
    if speculative is not None:
        from dsv3_jax.speculative import speculative_generate

        return speculative_generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, cache,
                                    on_token, speculative, stats)
    check_generate_args(prompts, max_new_tokens, temperature, model.cfg.vocab_size, top_k, top_p, seed, eos)
    L = max(map(len, prompts))
    limit = model.cfg.max_position_embeddings
    Lb = prefill_length(L) if prefill_length(L) + max_new_tokens <= limit else L
    # too long even unpadded: the exact length, which init_cache refuses with its message
    C = min(cache_length(Lb + max_new_tokens), limit) if Lb + max_new_tokens <= limit else L + max_new_tokens
    kv = model.init_cache(len(prompts), C, kind=cache)
    sampling = _settings(temperature, top_k, top_p)
    graph, state = nnx.split(model)
    key = jax.random.key(seed)
    shift = Lb - L  # extra left padding of the prefill: every cache entry moves right by it

    def step(tokens: list[list[int]], pos: int, mask: Optional[list[list[int]]]) -> list[int]:
        nonlocal kv, key
        key, sub = jax.random.split(key)
        last = pos + len(tokens[0]) - 1  # the position sampled from, as the caller counts it
        if pos == 0 and shift:
            mask = [[0] * shift + list(m) for m in (mask or [[1] * L for _ in tokens])]
            tokens = [[PAD_ID] * shift + list(t) for t in tokens]
        attention_mask = None if mask is None else jnp.asarray(mask, jnp.int32)
        run, at = (_prefill, 0) if pos == 0 else (_decode, jnp.int32(pos + shift))
        sampled, finite, kv = run(graph, state, jnp.asarray(tokens, jnp.int32), kv, at, sub, *sampling,
                                  attention_mask=attention_mask)
        check_logits_finite(np.asarray(finite).tolist(), last)
        return np.asarray(sampled).tolist()

    return decode_loop(prompts, max_new_tokens, eos, on_token, step)
