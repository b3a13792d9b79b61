"""The framework-free part of generation: argument checks and the decode loop.

Both `dsv3_torch.generate` and `dsv3_jax.generate` call `decode_loop` with a
`step` function that feeds tokens to their model's cache and samples. One
prefill of every prompt, LEFT-padded to the longest with an attention_mask
(1 = real token, 0 = padding) that the cache keeps, then one token per step
for every row: the models hide the padded entries and count each row's
positions over its real tokens only, so each row generates what its prompt
alone would.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence


def check_generate_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                        vocab_size: int) -> None:
    """Raise ValueError for empty prompts, out-of-vocabulary ids or bad settings."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    for p in prompts:
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")


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
