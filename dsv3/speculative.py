"""Speculative decoding with the model's first MTP depth as the draft: the framework-free part.

Shape legend: B batch (prompts), S tokens fed in one call, V vocab, n positions fed to the MTP depth.

Per step, for every row: the main latent cache holds positions [0, pos), the main model's hidden state
(after its final norm) at pos - 1 is known and the pending token x at pos is not yet in the cache.

1. draft: the MTP depth takes (hidden at i, embed(token at i + 1)) for the positions it has not seen yet,
   exactly as in training, and proposes d for pos + 1 (argmax, or a sample from its filtered
   distribution q);
2. verify: one cached forward of the main model on [x, d] at positions pos, pos + 1;
3. accept: greedy, iff the main argmax at pos is d; sampling, with probability min(1, p[d] / q[d]), else the
   token is drawn from normalise(max(p - q, 0)) (Leviathan et al., arXiv 2211.17192);
4. commit: when every unfinished row accepted, x, d and the bonus token the verifier samples at pos + 1
   (the new pending token) advance the batch by two positions; otherwise by one position: each row's new
   pending token is its accepted draft or its resampled correction. Cache entries past the committed length
   are simply overwritten by the next call (an MLA cache entry depends only on its own token and position),
   the main cache and the MTP depth's own attention cache alike.

The batch advances in lock-step (one shared position, as `dsv3.generation.decode_loop`): acceptance is
decided per row, and a row that accepted while another rejected keeps its accepted draft as its next token,
so no row ever commits a token the main model would not have produced; only the bonus token of such a row
is dropped. Rows still inside their (longer) prompt are fed their prompt tokens as forced drafts.

A framework supplies `SpeculativeSteps` (prefill / draft / verify on its model and caches); `speculative_loop`
is the rest: EOS and the token budget are checked on every committed token, and `SpeculativeStats` counts
drafted and accepted tokens. Sampling (its filters and coin flips) happens here, in numpy float64, from the
logits the framework returns, so both frameworks draw the same samples from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from dsv3.generation import check_logits_finite

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

    prefill(tokens [B][P]) -> (out at position P - 1 [B] | [B,V], finite [B]); keeps the hidden [B,P,D].
    draft(tokens [B][n], start_pos) -> (out [B] | [B,V], finite [B]): the MTP depth on the first n positions of
        the last kept main hidden (at start_pos..) and the embeddings of `tokens` (at start_pos + 1..);
        its prediction for start_pos + n + 1.
    verify(tokens [B][S], start_pos) -> (out [B,S] | [B,S,V], finite [B]); keeps the hidden [B,S,D].
    draft_verify(tokens, start_pos, pending [B], fixed [B], pos) -> (drafts [B], out [B,2], finite [B]), greedy
        only: draft(tokens, start_pos), its argmax replaced by fixed[b] where fixed[b] >= 0 (a forced prompt
        token), then verify([[pending[b], draft[b]]], pos); finite covers both calls.
    """

    def prefill(self, tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]: ...

    def draft(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]: ...

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]: ...

    def draft_verify(self, tokens: list[list[int]], start_pos: int, pending: list[int], fixed: list[int],
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


def speculative_loop(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: Optional[int],
                     on_token: Optional[Callable[[int, int], None]], steps: SpeculativeSteps, cache_len: int,
                     temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                     seed: int = 0, stats: Optional[SpeculativeStats] = None) -> list[list[int]]:
    """New tokens per prompt (cut after `eos`, which is kept), on_token(row, token) streaming them; the
    arguments are those of `generate`, already checked. cache_len: the main cache's length (a step that
    has no room for the draft's position verifies the pending token alone)."""
    run = _SpeculativeRun(prompts, max_new_tokens, eos, on_token, steps, temperature, top_k, top_p, seed,
                          SpeculativeStats() if stats is None else stats)
    if max_new_tokens == 0:
        return run.new
    P = min(run.lens)
    out, finite = steps.prefill([list(p[:P]) for p in prompts])
    check_logits_finite(finite.tolist(), P - 1)
    pos = P  # position of the pending token x
    x = run.at(pos, run.pick(out))
    mtp_tokens, mtp_start = [list(p[1:P]) + [x[b]] for b, p in enumerate(prompts)], 0
    while not all(run.done):
        if pos + 2 > cache_len:  # no room for a draft: verify the pending token alone
            out, finite = steps.verify([[t] for t in x], pos)
            run.stats.verify_calls += 1
            check_logits_finite(finite.tolist(), pos)
            y = run.at(pos + 1, run.pick(out[:, 0]))
            mtp_tokens, mtp_start, x, pos = [[t] for t in y], pos, y, pos + 1
            continue
        d, q, out = run.draft_and_verify(mtp_tokens, mtp_start, x, pos)
        accepted, y = run.judge(d, q, out, pos)
        if all(accepted[b] for b in range(run.B) if not run.done[b]):
            run.at(pos + 1, d)
            z = run.at(pos + 2, run.pick(out[:, 1]))  # the bonus token (or the prompt's)
            mtp_tokens, mtp_start, x, pos = [[d[b], z[b]] for b in range(run.B)], pos, z, pos + 2
        else:
            y = run.at(pos + 1, y)
            mtp_tokens, mtp_start, x, pos = [[t] for t in y], pos, y, pos + 1
    return run.new


class _SpeculativeRun:
    """The state of one `speculative_loop`: rows' new tokens, which rows are done, the sampler."""

    def __init__(self, prompts, max_new_tokens, eos, on_token, steps, temperature, top_k, top_p, seed, stats):
        self.prompts, self.max_new_tokens, self.eos, self.on_token = prompts, max_new_tokens, eos, on_token
        self.steps, self.stats = steps, stats
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self.rng = np.random.default_rng(seed)
        self.B, self.lens = len(prompts), [len(p) for p in prompts]
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

    def at(self, pos: int, chosen: list[int]) -> list[int]:
        """The token at pos of every row: the prompt's, or the chosen one (then emitted)."""
        x = [self.prompts[b][pos] if pos < self.lens[b] else chosen[b] for b in range(self.B)]
        for b in range(self.B):
            if pos >= self.lens[b]:
                self.emit(b, x[b])
        return x

    def draft_and_verify(self, mtp_tokens, mtp_start, x, pos):
        """Draft the token at pos + 1 (a row still in its prompt takes the prompt's) and verify [x, draft]
        -> (drafts d [B], draft probabilities q [B,V] or None (greedy), verifier output)."""
        B, prompts = self.B, self.prompts
        forced = [pos + 1 < self.lens[b] for b in range(B)]
        q = None
        if self.greedy:  # the draft never leaves the device: one call drafts and verifies
            fixed = [prompts[b][pos + 1] if forced[b] else -1 for b in range(B)]
            d_arr, out, finite = self.steps.draft_verify(mtp_tokens, mtp_start, x, fixed, pos)
            d = [int(t) for t in d_arr]
        else:
            q_out, finite = self.steps.draft(mtp_tokens, mtp_start)
            check_logits_finite(finite.tolist(), pos + 1)
            q = self.probs(q_out)
            d = [prompts[b][pos + 1] if forced[b] else sample(q[b], self.rng) for b in range(B)]
            out, finite = self.steps.verify([[x[b], d[b]] for b in range(B)], pos)
        self.stats.verify_calls += 1
        check_logits_finite(finite.tolist(), pos + 1)
        return d, q, out

    def judge(self, d, q, out, pos):
        """Accept or reject each row's draft -> (accepted [B], y: the token at pos + 1 if the batch
        advances by one). Rows still in their prompt always accept."""
        accepted, y = [True] * self.B, list(d)
        for b in range(self.B):
            if pos + 1 < self.lens[b]:
                continue
            if self.greedy:
                accepted[b] = int(out[b, 0]) == d[b]
                y[b] = int(out[b, 0])
            else:
                accepted[b], y[b] = accept_or_resample(self.probs(out[b, 0]), q[b], d[b], self.rng)
            if not self.done[b]:
                self.stats.drafted += 1
                self.stats.accepted += int(accepted[b])
        return accepted, y
