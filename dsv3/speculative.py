"""Speculative decoding with the model's first MTP depth as the draft: the framework-free part.

Shape legend: B batch (prompts), S tokens fed in one call, V vocab, n positions fed to the MTP depth.

The prompts are LEFT-padded to the longest (`dsv3.generation.left_pad`), so every row's pending token sits
at the same cache entry ("slot") s; the caches keep an attention mask (1 = real entry) and each row counts
its positions over its real entries only. Per step, for every row:

1. draft: the MTP depth takes (hidden at i, embed(next real token after i)) for the slots it has not seen
   yet, exactly as in training, and proposes d for the slot s + 1 (argmax, or a sample from its filtered
   distribution q);
2. verify: one cached forward of the main model on [x, d] at slots s, s + 1;
3. accept: greedy, iff the main argmax after x is d; sampling, with probability min(1, p[d] / q[d]), else the
   token is drawn from normalise(max(p - q, 0)) (Leviathan et al., arXiv 2211.17192);
4. commit, per row: a row that accepted commits d and the bonus token the verifier gives after d (two new
   tokens); a row that rejected commits its correction, and its slot s + 1 (the rejected draft) becomes a
   hole: the next call marks it 0 in the cache mask, so no later query attends to it and no position
   counts it (an MLA cache entry depends only on its own token and position, so nothing is recomputed).
   Either way the new pending token goes to slot s + 2: rows advance in lock-step through the slots but
   each by its own accepted length.

The MTP depth's own attention cache uses the same slots and the same mask: after a step it is fed the
pairs of slots s and s + 1 (for a row that rejected, (hidden at s, embed(correction)) and a hole), and
drafts from the last real one.

Holes cost cache entries: a step uses two slots and gains each row one or two tokens. When the cache has no
room left for the worst case (every later draft rejected), the loop verifies the pending token alone, one
slot per token, until the end.

A framework supplies `SpeculativeSteps` (prefill / draft / verify on its model and caches); `speculative_loop`
is the rest: EOS and the token budget are checked on every committed token, and `SpeculativeStats` counts
drafted and accepted tokens. Sampling (its filters and coin flips) happens here, in numpy float64, from the
logits the framework returns, so both frameworks draw the same samples from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from dsv3.generation import check_logits_finite, left_pad

SPECULATIVE_KINDS = ("mtp",)


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation, summed over rows (finished rows are not counted).

    drafted: MTP drafts verified (forced prompt tokens excluded); accepted: drafts the main model accepted;
    verify_calls: main-model calls after the prefill; tokens: new tokens returned.
    """

    drafted: int = 0
    accepted: int = 0
    verify_calls: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (nan before any draft)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per row per verify step, the verifier's own token included: 1 + accepted / drafted
        (one MTP depth drafts one token per verify step)."""
        return 1.0 + self.accepted / self.drafted if self.drafted else float("nan")


class SpeculativeSteps(Protocol):
    """A framework's model calls. Each returns numpy arrays: greedy, the argmax token ids; sampling, the float
    logits; and a bool array, whether each row's logits were all finite.

    prefill(tokens [B][P], mask [B][P] or None) -> (out at slot P - 1 [B] | [B,V], finite [B]): the main model
        on the left-padded prompts (mask: 1 = real token); keeps the hidden [B,P,D].
    draft(tokens [B][n], start_pos, valid [B][n]) -> (out [B] | [B,V], finite [B]): first marks the main
        cache's slots start_pos.. with `valid` (0 turns a rejected draft into a hole), then runs the MTP depth
        on the first n slots of the last kept main hidden (at start_pos..) and the embeddings of `tokens`,
        with the same mask; its prediction from each row's last valid slot.
    verify(tokens [B][S], start_pos) -> (out [B,S] | [B,S,V], finite [B]); real tokens; keeps the hidden [B,S,D].
    draft_verify(tokens, start_pos, valid, pending [B], pos) -> (drafts [B], out [B,2], finite [B]), greedy
        only: draft(tokens, start_pos, valid)'s argmax d, then verify([[pending[b], d[b]]], pos); finite covers
        both calls.
    """

    def prefill(self, tokens: list[list[int]], mask: Optional[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]: ...

    def draft(self, tokens: list[list[int]], start_pos: int,
              valid: list[list[int]]) -> tuple[np.ndarray, np.ndarray]: ...

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]: ...

    def draft_verify(self, tokens: list[list[int]], start_pos: int, valid: list[list[int]], pending: list[int],
                     pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def check_speculative(kind: str, num_mtp_depths: int) -> None:
    """Raise ValueError unless `kind` is a known speculative scheme the model can run."""
    if kind not in SPECULATIVE_KINDS:
        raise ValueError(f"generate: speculative: must be one of {SPECULATIVE_KINDS} (got {kind!r})")
    if num_mtp_depths < 1:
        raise ValueError("generate: speculative='mtp' needs a model with an MTP module "
                         "(num_nextn_predict_layers >= 1)")


def filtered_probs(logits: np.ndarray, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> np.ndarray:
    """logits [..., V] -> float64 probabilities after temperature, top-k and top-p, the filters of
    `sample_next` in both frameworks (top-p drops a token once the mass before it reaches top_p)."""
    z = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        kth = -np.sort(-z, axis=-1)[..., min(top_k, z.shape[-1]) - 1:min(top_k, z.shape[-1])]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-z, axis=-1, kind="stable")
        zs = np.take_along_axis(z, order, axis=-1)
        ps = np.exp(zs - zs[..., :1])
        ps /= ps.sum(-1, keepdims=True)
        drop = (np.cumsum(ps, axis=-1) - ps) >= top_p
        np.put_along_axis(z, order, np.where(drop, -np.inf, zs), axis=-1)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from the probabilities p [V] (inverse CDF on one uniform draw)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def accept_or_resample(p: np.ndarray, q: np.ndarray, d: int, rng: np.random.Generator) -> tuple[bool, int]:
    """The speculative-sampling rule for a draft d ~ q against the target p (both [V]):
    (True, d) with probability min(1, p[d] / q[d]), else (False, a sample of normalise(max(p - q, 0))).
    The returned token is distributed exactly as p."""
    if rng.random() * q[d] < p[d]:  # u < p/q, written without dividing (q[d] > 0 since d ~ q)
        return True, d
    residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0:  # p == q up to rounding: the rejection had probability ~0
        residual = p
    return False, sample(residual, rng)


def cache_slots(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_positions: int) -> int:
    """Cache entries for `speculative_loop`: room for a hole per new token (the longest prompt + 2 per new
    token), within the model's positions; never fewer than plain decoding needs."""
    P = max(map(len, prompts))
    return max(P + max_new_tokens, min(P + 2 * max_new_tokens, max_positions))


def speculative_loop(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Optional[int],
                     on_token: Optional[Callable[[int, int], None]], steps: SpeculativeSteps, cache_len: int,
                     temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                     seed: int = 0, stats: Optional[SpeculativeStats] = None) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept), on_token(row, token) streaming them; the
    arguments are those of `generate`, already checked. cache_len: the caches' entries (`cache_slots`)."""
    run = _SpeculativeRun(max_new_tokens, eos, on_token, steps, temperature, top_k, top_p, seed,
                          SpeculativeStats() if stats is None else stats, len(prompts))
    if max_new_tokens == 0:
        return run.new
    tokens, mask = left_pad(prompts)
    P = len(tokens[0])
    out, finite = steps.prefill(tokens, mask)
    check_logits_finite(finite.tolist(), P - 1)
    x = run.commit(run.pick(out))  # the pending token of every row, at slot P
    # the MTP depth's pairs (hidden at i, embed(token at i + 1)) for the prompt's slots 0..P-1
    feed = ([row[1:] + [t] for row, t in zip(tokens, x)], 0, mask or [[1] * P for _ in tokens])
    pos, drafting = P, True
    while not all(run.done):
        # a step takes two slots and may gain a row only one token: draft while the rest still fits
        if drafting and cache_len - (pos + 2) < run.most_left() - 1:
            drafting = False
            if pos > P:  # the last step's holes are marked by a draft call; its draft is not needed
                steps.draft(*feed)
        if not drafting:  # the pending token alone, one slot per token (the MTP depth is not needed again)
            out, finite = steps.verify([[t] for t in x], pos)
            run.stats.verify_calls += 1
            check_logits_finite(finite.tolist(), pos)
            x, pos = run.commit(run.pick(out[:, 0])), pos + 1
            continue
        d, q, out = run.draft_and_verify(feed, x, pos)
        accepted, y = run.judge(d, q, out)
        z = [run.pick(out[b:b + 1, 1])[0] if accepted[b] else None for b in range(run.B)]  # bonus tokens
        x = [z[b] if accepted[b] else y[b] for b in range(run.B)]
        for b in range(run.B):  # each row commits its accepted draft and bonus, or its correction
            for t in ([d[b], z[b]] if accepted[b] else [y[b]]):
                run.emit(b, t)
        feed = ([[d[b], z[b]] if accepted[b] else [y[b], y[b]] for b in range(run.B)], pos,
                [[1, int(accepted[b])] for b in range(run.B)])
        pos += 2
    return run.new


class _SpeculativeRun:
    """The state of one `speculative_loop`: rows' new tokens, which rows are done, the sampler."""

    def __init__(self, max_new_tokens, eos, on_token, steps, temperature, top_k, top_p, seed, stats, batch):
        self.max_new_tokens, self.eos, self.on_token = max_new_tokens, eos, on_token
        self.steps, self.stats = steps, stats
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self.rng = np.random.default_rng(seed)
        self.B = batch
        self.new: list[list[int]] = [[] for _ in range(self.B)]
        self.done = [False] * self.B

    def probs(self, logits):
        return filtered_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, out: np.ndarray) -> list[int]:
        """out [B] ids (greedy) or [B,V] logits -> one token per row."""
        if self.greedy:
            return [int(t) for t in out]
        return [sample(self.probs(row), self.rng) for row in out]

    def emit(self, b: int, tok: int) -> None:
        """Commit a generated token of row b."""
        if self.done[b]:
            return
        self.new[b].append(tok)
        self.stats.tokens += 1
        if self.on_token is not None:
            self.on_token(b, tok)
        self.done[b] = (self.eos is not None and tok == self.eos) or len(self.new[b]) >= self.max_new_tokens

    def commit(self, chosen: list[int]) -> list[int]:
        """Emit one token per row; returns them."""
        for b, t in enumerate(chosen):
            self.emit(b, t)
        return chosen

    def most_left(self) -> int:
        """The most tokens an unfinished row still needs."""
        return max(self.max_new_tokens - len(self.new[b]) for b in range(self.B) if not self.done[b])

    def draft_and_verify(self, feed, x, pos):
        """Feed the MTP depth, draft the token at slot pos + 1 and verify [x, draft] at pos
        -> (drafts d [B], draft probabilities q [B,V] or None (greedy), verifier output)."""
        tokens, start, valid = feed
        q = None
        if self.greedy:  # the draft never leaves the device: one call drafts and verifies
            d_arr, out, finite = self.steps.draft_verify(tokens, start, valid, x, pos)
            d = [int(t) for t in d_arr]
        else:
            q_out, finite = self.steps.draft(tokens, start, valid)
            check_logits_finite(finite.tolist(), pos + 1)
            q = self.probs(q_out)
            d = [sample(q[b], self.rng) for b in range(self.B)]
            out, finite = self.steps.verify([[x[b], d[b]] for b in range(self.B)], pos)
        self.stats.verify_calls += 1
        check_logits_finite(finite.tolist(), pos + 1)
        return d, q, out

    def judge(self, d, q, out):
        """Accept or reject each row's draft -> (accepted [B], y: each row's correction where rejected)."""
        accepted, y = [True] * self.B, list(d)
        for b in range(self.B):
            if self.greedy:
                accepted[b] = int(out[b, 0]) == d[b]
                y[b] = int(out[b, 0])
            else:
                accepted[b], y[b] = accept_or_resample(self.probs(out[b, 0]), q[b], d[b], self.rng)
            if not self.done[b]:
                self.stats.drafted += 1
                self.stats.accepted += int(accepted[b])
        return accepted, y
