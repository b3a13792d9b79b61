"""The framework-free part of generation: argument checks, left padding, the decode loop and the
bucketed prefill/cache lengths (powers of two, so that compiled steps are shared across prompt lengths).

Both `dsv3_torch.generate` and `dsv3_jax.generate` call `decode_loop` with a
`step` function that feeds tokens to their model's cache and samples. One
prefill of every prompt, LEFT-padded to the longest with an attention_mask
(1 = real token, 0 = padding) that the cache keeps, then one token per step
for every row: the models hide the padded entries and count each row's
positions over its real tokens only, so each row generates what its prompt
alone would.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence

from dsv3.config import _Rule, _check

# The sampling settings of `generate` / `sample_next`, one rule each (the machinery of ModelConfig).
SAMPLING_RULES: dict[str, _Rule] = {
    "temperature": _Rule("real", 0, low_open=False),  # 0: greedy
    "top_k": _Rule("int", 0, nullable=True),  # None: no top-k cut
    "top_p": _Rule("real", 0, high=1, nullable=True),  # None (or 1): no nucleus cut
}
GENERATE_RULES: dict[str, _Rule] = {
    **SAMPLING_RULES,
    "max_new_tokens": _Rule("int", 0, low_open=False),
    "seed": _Rule("int"),
    "eos": _Rule("int", 0, low_open=False, nullable=True),
}
_WHERE = "generate: "


class NonFiniteLogits(RuntimeError):
    """The model produced NaN or infinite logits while generating (broken weights or overflow)."""


def check_sampling_args(temperature: Any, top_k: Any, top_p: Any) -> None:
    """Raise ValueError "generate: <name>: must be ... (got ...)" for a bad sampling setting.

    temperature a finite number >= 0, top_k None or an integer >= 1, top_p None or in (0, 1].
    """
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        _check(_WHERE, name, value, SAMPLING_RULES[name])


def check_generate_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                        vocab_size: int, top_k: Optional[int] = None, top_p: Optional[float] = None,
                        seed: int = 0, eos: Optional[int] = None) -> None:
    """Raise ValueError naming the argument: empty prompts, ids that are not integers (floats and
    bools are refused) or lie outside [0, vocab_size), and every setting of `GENERATE_RULES`.

    The one check of both frameworks' ``generate``, so both give the same message.
    """
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                  seed=seed, eos=eos)
    for name, value in values.items():
        _check(_WHERE, name, value, GENERATE_RULES[name])
    if eos is not None and eos >= vocab_size:
        raise ValueError(f"{_WHERE}eos: must lie in [0, vocab_size={vocab_size}) (got {eos!r})")
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
        raise ValueError(f"{_WHERE}prompts: must be a non-empty list of prompts, each a list of token ids "
                         f"(got {prompts!r:.80})")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) == 0:
            raise ValueError(f"{_WHERE}prompts[{i}]: must be a non-empty prompt, a list of token ids "
                             f"(got {p!r:.80})")
        for t in p:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):  # numpy bools are not Integral
                raise ValueError(f"{_WHERE}prompts[{i}]: token ids must be integers (got {t!r} of type "
                                 f"{type(t).__name__})")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"{_WHERE}prompts[{i}]: token ids must lie in [0, {vocab_size}) "
                             f"(got min {min(p)}, max {max(p)})")


def check_logits_finite(finite: Sequence[bool], pos: int) -> None:
    """Raise NonFiniteLogits unless every row's logits were finite (``finite[b]``) at step `pos`."""
    bad = [b for b, ok in enumerate(finite) if not ok]
    if bad:
        raise NonFiniteLogits(
            f"generate: the model produced NaN or infinite logits at position {pos} for prompt rows {bad}; "
            "no token can be sampled from them (non-finite weights, or an overflow in a low-precision dtype)")


PAD_ID = 0  # the token id fed at padded positions (never attended to, never counted)


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], Optional[list[list[int]]]]:
    """Prompts LEFT-padded with PAD_ID to the longest -> (tokens [B][L], attention_mask [B][L] with
    1 = real token, 0 = padding), the mask None when every prompt has the same length."""
    L = max(len(p) for p in prompts)
    tokens = [[PAD_ID] * (L - len(p)) + list(p) for p in prompts]
    if all(len(p) == L for p in prompts):
        return tokens, None
    return tokens, [[0] * (L - len(p)) + [1] * len(p) for p in prompts]


def decode_loop(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Optional[int],
                on_token: Optional[Callable[[int, int], None]],
                step: Callable[[list[list[int]], int, Optional[list[list[int]]]], list[int]]) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept); on_token(row, token) streams them.

    step(tokens [B][S], start_pos, attention_mask [B][S] or None) feeds the tokens at cache
    entries start_pos.. and returns the token sampled from each row's last position. The first
    call is the left-padded prefill (its mask None when no row is padded), every later one feeds
    one real token per row with attention_mask None. A row that is done keeps being fed its
    samples (don't-care) until every row is.
    """
    B = len(prompts)
    new: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return new
    tokens, mask = left_pad(prompts)
    sampled = step(tokens, 0, mask)
    done = [False] * B
    pos = len(tokens[0])  # cache entry of the token being chosen now
    while True:
        for b in range(B):
            if not done[b]:
                tok = sampled[b]
                new[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
                done[b] = (eos is not None and tok == eos) or len(new[b]) >= max_new_tokens
        if all(done):
            return new
        sampled = step([[t] for t in sampled], pos, None)
        pos += 1


# Bucketed lengths: a compiled (JAX) decode step serves every prompt and budget that lands in the same bucket.
def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def prefill_length(n: int) -> int:
    """The bucketed prefill length of a longest prompt of n tokens: a power of two >= 8 up to 256, then a
    multiple of 256 (at most 2x the work for short prompts, under 1/256 more beyond)."""
    return _pow2(n, 8) if n <= 256 else -(-n // 256) * 256


def cache_length(n: int) -> int:
    """The bucketed cache length for n entries: a power of two >= 32 up to 1024, then a multiple of 1024."""
    return _pow2(n, 32) if n <= 1024 else -(-n // 1024) * 1024
