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
from dsv3.speculative import SpeculativeStats, check_speculative, speculative_loop


class SpeculativeSteps:
    """prefill / draft / verify of `dsv3.speculative.SpeculativeSteps` on a torch DeepSeekV3.

    greedy: return argmax token ids (else fp32 logits). Caches of `cache_len` positions of kind `cache`."""

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
    def _main(self, tokens: list[list[int]], start_pos: int) -> torch.Tensor:
        t = torch.tensor(tokens, device=self.device)
        self.hidden, _ = self.model.hidden_cached(t, self.main_cache, start_pos)
        return self.model.head(self.hidden)

    def prefill(self, tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][P] at 0.. -> the main model's output at P - 1 (ids [B] or logits [B,V]), finite [B]."""
        return self._out(self._main(tokens, 0)[:, -1])

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][S] at start_pos.. -> the main model's outputs (ids [B,S] or logits [B,S,V]), finite [B]."""
        return self._out(self._main(tokens, start_pos))

    @torch.inference_mode()
    def draft(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """MTP depth 1 on (kept hidden[:, :n], embed(tokens [B][n])) at start_pos.. -> its output at the
        last position (ids [B] or logits [B,V]), finite [B]."""
        m, mod = self.model, self.model.mtp[0]
        n = len(tokens[0])
        emb = m.embed(torch.tensor(tokens, device=self.device))
        cos, sin = m._rope(start_pos, n, self.device)
        h, self.mtp_cache = mod.forward_cached(self.hidden[:, :n], emb, cos, sin, start_pos, self.mtp_cache)
        return self._out(m.head(mod.norm(h[:, -1])))


    def draft_verify(self, tokens: list[list[int]], start_pos: int, pending: list[int], fixed: list[int],
                     pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy: draft at start_pos.. (its argmax, or fixed[b] where fixed[b] >= 0), then verify [pending, draft]
        at pos -> (drafts [B], verified ids [B,2], finite [B] of both calls)."""
        q, q_finite = self.draft(tokens, start_pos)
        d = np.where(np.asarray(fixed) >= 0, np.asarray(fixed), q)
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
    cache_len = max(map(len, prompts)) + max_new_tokens
    steps = SpeculativeSteps(model, len(prompts), cache_len, temperature == 0, cache)
    return speculative_loop(prompts, max_new_tokens, eos, on_token, steps, cache_len, temperature, top_k, top_p,
                            seed, stats)
