"""Autoregressive generation on the MLA cache (docs/reference.md §2.1 decoding; docs/API.md).

Shape legend: B batch (prompts), S tokens fed in one call, V vocab.

One prefill of every prompt LEFT-padded to the longest (its attention_mask kept
in the cache: padded entries hidden, per-row positions), then one token per step
(``dsv3.generation.decode_loop``). The default cache is the compressed latent (C + R values per token per layer) with
weight-absorbed attention; ``cache="naive"`` keeps expanded K/V instead.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from dsv3.generation import check_generate_args, check_logits_finite, check_sampling_args, decode_loop


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy when temperature == 0, else top-k / top-p sampling."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass BEFORE it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             eos: Optional[int] = None, cache: str = "latent",
             on_token: Optional[Callable[[int, int], None]] = None, speculative: Optional[str] = None,
             stats=None) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept). on_token(row, token) streams them.

    speculative="mtp": the MTP depths draft the next tokens (depth k the k-th after the pending one, chained)
    and the model verifies them (dsv3_torch.speculative; greedy gives the same tokens, sampling the same distribution); `stats`, a
    dsv3.speculative.SpeculativeStats, is then filled in place."""
    if speculative is not None:
        from dsv3_torch.speculative import speculative_generate

        return speculative_generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, cache,
                                    on_token, speculative, stats)
    check_generate_args(prompts, max_new_tokens, temperature, model.cfg.vocab_size, top_k, top_p, seed, eos)
    device = model.head.weight.device
    kv = model.init_cache(len(prompts), max(map(len, prompts)) + max_new_tokens, kind=cache)
    gen = torch.Generator().manual_seed(seed)

    def step(tokens: list[list[int]], pos: int, mask: Optional[list[list[int]]]) -> list[int]:
        attention_mask = None if mask is None else torch.tensor(mask, device=device)
        logits, _ = model.forward_cached(torch.tensor(tokens, device=device), kv, pos, attention_mask)
        last = logits[:, -1]
        check_logits_finite(torch.isfinite(last).all(dim=-1).tolist(), pos + len(tokens[0]) - 1)
        return sample_next(last, temperature, top_k, top_p, gen).tolist()

    return decode_loop(prompts, max_new_tokens, eos, on_token, step)
