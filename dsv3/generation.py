"""The framework-free part of generation: argument checks and the decode loop.

Both `dsv3_torch.generate` and `dsv3_jax.generate` call `decode_loop` with a
`step` function that feeds tokens to their model's cache and samples. One
prefill of the shortest common prompt length P, then one token per step; a
row still inside its own prompt is fed its next prompt token instead of a
sample, so prompts of different lengths share positions and one cache.
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


def decode_loop(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Optional[int],
                on_token: Optional[Callable[[int, int], None]],
                step: Callable[[list[list[int]], int], list[int]]) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept); on_token(row, token) streams them.

    step(tokens [B][S], start_pos) feeds the tokens at start_pos and returns the
    token sampled from each row's last position.
    """
    B, lens = len(prompts), [len(p) for p in prompts]
    new: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return new
    P = min(lens)
    sampled = step([list(p[:P]) for p in prompts], 0)
    done = [False] * B
    pos = P  # position of the token being chosen now
    while True:
        fed = []
        for b in range(B):
            tok = prompts[b][pos] if pos < lens[b] else sampled[b]
            fed.append(tok)
            if pos >= lens[b] and not done[b]:
                new[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
                done[b] = (eos is not None and tok == eos) or len(new[b]) >= max_new_tokens
        if all(done):
            return new
        sampled = step([[t] for t in fed], pos)
        pos += 1
