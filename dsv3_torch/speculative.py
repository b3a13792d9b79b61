"""Speculative decoding with the MTP depths as the draft: the torch model calls (dsv3.speculative).

Shape legend: B batch, S tokens fed in one call, n slots fed to the MTP depths, D model width, V vocab,
K MTP depths.

`SpeculativeSteps` holds the main latent cache, each MTP depth's own attention cache and the main hidden
state at every filled slot; `dsv3.speculative.speculative_loop` drives it (draft, verify, accept, commit).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dsv3.generation import check_generate_args
from dsv3.speculative import SpeculativeStats, cache_slots, check_speculative, resolve_codes, speculative_loop
from dsv3_torch.mla import visible_mask
from dsv3_torch.model import cached_keys


class SpeculativeSteps:
    """prefill / draft / verify of `dsv3.speculative.SpeculativeSteps` on a torch DeepSeekV3.

    greedy: return argmax token ids (else fp32 logits). Caches of `cache_len` entries of kind `cache`; the
    main cache's mask (1 = real entry) also masks the MTP depths' caches, which use the same entries."""

    def __init__(self, model, batch: int, cache_len: int, greedy: bool, cache: str = "latent"):
        self.model, self.greedy = model, greedy
        self.depths = len(model.mtp)
        self.main_cache = model.init_cache(batch, cache_len, kind=cache)
        self.mtp_caches = [mod.block.attn.init_cache(batch, cache_len, cache) for mod in model.mtp]
        self.device = model.head.weight.device
        # the main hidden after the final norm at every slot a main call filled [B, cache_len, D]
        self.hidden = torch.zeros(batch, cache_len, model.cfg.hidden_size, dtype=model.dtype, device=self.device)
        self.mtp_hidden = None  # the last draft call's depth output (before its norm) [B,n,D]

    def _out(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        finite = torch.isfinite(logits).flatten(1).all(dim=-1).cpu().numpy()
        if self.greedy:
            return logits.argmax(dim=-1).cpu().numpy(), finite
        return logits.float().cpu().numpy(), finite

    @torch.inference_mode()
    def _main(self, tokens: list[list[int]], start_pos: int, mask=None) -> torch.Tensor:
        t = torch.tensor(tokens, device=self.device)
        m = None if mask is None else torch.tensor(mask, device=self.device)
        h, _ = self.model.hidden_cached(t, self.main_cache, start_pos, m)
        self.hidden[:, start_pos:start_pos + h.shape[1]] = h
        return self.model.head(h)

    def prefill(self, tokens: list[list[int]], mask: Optional[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][P] (left-padded; mask 1 = real, or None) at 0.. -> the main model's output at P - 1
        (ids [B] or logits [B,V]), finite [B]."""
        return self._out(self._main(tokens, 0, mask)[:, -1])

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B][S] at start_pos.. -> the main model's outputs (ids [B,S] or logits [B,S,V]), finite [B]."""
        return self._out(self._main(tokens, start_pos))

    @torch.inference_mode()
    def draft(self, k: int, tokens: list[list[int]], start_pos: int,
              valid: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Depth k (1-based) on the slots start_pos.. : mark the main cache's entries there with valid [B][n]
        (0: a hole), then (previous hidden there, embed(tokens [B][n])) through the depth -> its output at
        each row's last valid entry (ids [B] or logits [B,V]), finite [B]. The previous hidden: the main
        model's (k = 1) or the last draft call's (depth k - 1 on the same slots)."""
        m, mod, cache = self.model, self.model.mtp[k - 1], self.main_cache
        n = len(tokens[0])
        new = torch.tensor(valid, dtype=torch.bool, device=self.device)
        keys, positions = cached_keys(cache, new, start_pos)
        cos, sin = m.rope(positions, m.dtype)
        emb = m.embed(torch.tensor(tokens, device=self.device))
        h_prev = self.hidden[:, start_pos:start_pos + n] if k == 1 else self.mtp_hidden
        self.mtp_hidden, self.mtp_caches[k - 1] = mod.forward_cached(
            h_prev, emb, cos, sin, start_pos, self.mtp_caches[k - 1], visible_mask(keys, start_pos, n), new)
        last = n - 1 - new.flip(1).to(torch.int8).argmax(1)  # each row's last valid entry
        return self._out(m.head(mod.norm(self.mtp_hidden[torch.arange(self.mtp_hidden.shape[0]), last])))

    def draft_verify(self, codes: list[list[list[int]]], start_pos: int, valid: list[list[int]],
                     pending: list[int], pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy: draft(k, ...) for every depth k, with codes[k - 1] (-i: the argmax draft d_i), then verify
        [pending, d_1 .. d_K] at pos -> (drafts [B,K], verified ids [B,K+1], finite [B] of every call)."""
        d, finite = np.zeros((len(pending), 0), np.int64), np.ones(len(pending), bool)
        for k, ck in enumerate(codes, start=1):
            dk, fk = self.draft(k, resolve_codes(ck, d), start_pos, valid)
            d, finite = np.concatenate([d, dk[:, None]], axis=1), finite & fk
        out, fv = self.verify([[x, *map(int, row)] for x, row in zip(pending, d)], pos)
        return d, out, finite & fv


def speculative_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                         eos: Optional[int] = None, cache: str = "latent",
                         on_token: Optional[Callable[[int, int], None]] = None, speculative: str = "mtp",
                         stats: Optional[SpeculativeStats] = None) -> list[list[int]]:
    """`generate` with the model's MTP depths drafting a chain of tokens per step; greedy, the same tokens as
    `generate`, sampling, the same distribution. `stats` (a SpeculativeStats) is filled in place."""
    check_generate_args(prompts, max_new_tokens, temperature, model.cfg.vocab_size, top_k, top_p, seed, eos)
    check_speculative(speculative, len(model.mtp))
    cache_len = cache_slots(prompts, max_new_tokens, model.cfg.max_position_embeddings, len(model.mtp))
    steps = SpeculativeSteps(model, len(prompts), cache_len, temperature == 0, cache)
    return speculative_loop(prompts, max_new_tokens, eos, on_token, steps, cache_len, temperature, top_k, top_p,
                            seed, stats)
