"""Speculative decoding with the first MTP depth as the draft: the torch model calls (dsv3.speculative).

Shape legend: B batch, S tokens fed in one call, n positions fed to the MTP depth, D model width, V vocab.

`SpeculativeSteps` holds the main latent cache, the MTP depth's own attention cache and the main hidden
state of the last call; `dsv3.speculative.speculative_loop` drives it (draft, verify, accept, commit).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dsv3.generation import check_generate_args
from dsv3.speculative import SpeculativeStats, cache_slots, check_speculative, speculative_loop
from dsv3_torch.mla import visible_mask
from dsv3_torch.model import cached_keys


class SpeculativeSteps:
    """prefill / draft / verify of `dsv3.speculative.SpeculativeSteps` on a torch DeepSeekV3.

    greedy: return argmax token ids (else fp32 logits). Caches of `cache_len` entries of kind `cache`; the
    main cache's mask (1 = real entry) also masks the MTP depth's cache, which uses the same entries."""

    def __init__(self, model, batch: int, cache_len: int, greedy: bool, cache: str = "latent"):
        self.model, self.greedy = model, greedy
        self.main_cache = model.init_cache(batch, cache_len, kind=cache)
        self.mtp_cache = model.mtp[0].block.attn.init_cache(batch, cache_len, cache)
        self.device = model.head.weight.device
        self.hidden = None  # the main hidden after the final norm of the last main call [B,S,D]

    def _out(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        finite = torch.isfinite(logits).flatten(1).all(dim=-1).cpu().numpy()
        if self.greedy:
            return logits.argmax(dim=-1).cpu().numpy(), finite
        return logits.float().cpu().numpy(), finite

    @torch.inference_mode()
    def _main(self, tokens: list[list[int]], start_pos: int, mask=None) -> torch.Tensor:
        t = torch.tensor(tokens, device=self.device)
        m = None if mask is None else torch.tensor(mask, device=self.device)
        self.hidden, _ = self.model.hidden_cached(t, self.main_cache, start_pos, m)
        return self.model.head(self.hidden)

    def prefill(self, tokens: list[list[int]], mask: Optional[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][P] (left-padded; mask 1 = real, or None) at 0.. -> the main model's output at P - 1
        (ids [B] or logits [B,V]), finite [B]."""
        return self._out(self._main(tokens, 0, mask)[:, -1])

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][S] at start_pos.. -> the main model's outputs (ids [B,S] or logits [B,S,V]), finite [B]."""
        return self._out(self._main(tokens, start_pos))

    @torch.inference_mode()
    def draft(self, tokens: list[list[int]], start_pos: int,
              valid: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Mark the main cache's entries start_pos.. with valid [B][n] (0: a hole), then MTP depth 1 on
        (kept hidden[:, :n], embed(tokens [B][n])) there -> its output at each row's last valid entry
        (ids [B] or logits [B,V]), finite [B]."""
        m, mod, cache = self.model, self.model.mtp[0], self.main_cache
        n = len(tokens[0])
        new = torch.tensor(valid, dtype=torch.bool, device=self.device)
        keys, positions = cached_keys(cache, new, start_pos)
        cos, sin = m.rope(positions, m.dtype)
        emb = m.embed(torch.tensor(tokens, device=self.device))
        h, self.mtp_cache = mod.forward_cached(self.hidden[:, :n], emb, cos, sin, start_pos, self.mtp_cache,
                                               visible_mask(keys, start_pos, n), new)
        last = n - 1 - new.flip(1).to(torch.int8).argmax(1)  # each row's last valid entry
        return self._out(m.head(mod.norm(h[torch.arange(h.shape[0]), last])))

    def draft_verify(self, tokens: list[list[int]], start_pos: int, valid: list[list[int]], pending: list[int],
                     pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy: draft(tokens, start_pos, valid)'s argmax d, then verify [pending, d] at pos
        -> (drafts [B], verified ids [B,2], finite [B] of both calls)."""
        d, q_finite = self.draft(tokens, start_pos, valid)
        out, finite = self.verify([[x, int(t)] for x, t in zip(pending, d)], pos)
        return d, out, finite & q_finite


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
    steps = SpeculativeSteps(model, len(prompts), cache_len, temperature == 0, cache)
    return speculative_loop(prompts, max_new_tokens, eos, on_token, steps, cache_len, temperature, top_k, top_p,
                            seed, stats)
