"""Speculative decoding with the model's MTP depths as the draft: the framework-free part.

Shape legend: B batch (prompts), S tokens fed in one call, V vocab, K MTP depths (drafts per step),
n slots fed to the MTP depths (the window), W = K (K + 1) the window's width.

The prompts are LEFT-padded to the longest (`dsv3.generation.left_pad`), so every row's pending token sits
at the same cache entry ("slot") s; the caches keep an attention mask (1 = real entry) and each row counts
its positions over its real entries only. Depth k of the MTP module (Paper §2.2) takes, at each real
position j, the previous depth's hidden at j (depth 1: the main model's) and the embedding of the token
k positions later, and predicts the token k + 1 positions later. Per step, for every row:

1. draft (Paper §5.4.3, chained over the depths): at the row's last real slot before s, whose next token is
   the pending x, depth 1 proposes d_1 (the token after x); depth k then takes depth k - 1's hidden there and
   embed(d_{k-1}) and proposes d_k (argmax, or a sample from its filtered distribution q_k);
2. verify: one cached forward of the main model on [x, d_1 .. d_K] at slots s .. s + K;
3. accept, draft by draft until the first rejection: greedy, d_i iff it is the main argmax after d_{i-1};
   sampling, with probability min(1, p_i[d_i] / q_i[d_i]), else the row's next token is drawn from
   normalise(max(p_i - q_i, 0)) (Leviathan et al., arXiv 2211.17192). When all K pass, the verifier's own
   token after d_K is the bonus;
4. commit, per row: the a accepted drafts and the correction or bonus token (a + 1 new tokens); the slots of
   the rejected drafts become holes: the next call marks them 0 in the cache mask, so no later query attends
   to them and no position counts them (an MLA cache entry depends only on its own token and position, so
   nothing is recomputed). The new pending token goes to slot s + K + 1: rows advance in lock-step through
   the slots but each by its own accepted length.

The MTP depths' own attention caches use the same slots and the same mask. Depth k's entry at a real slot
is final once the token k positions later is committed; until then it holds a draft, so each step feeds
every depth again over the window [s - W, s) (the slots of this and the last K - 1 steps, which hold every
entry not yet final; recomputing a final one writes the same value), the token k positions after each real
slot taken from the committed tokens or, past the pending one, from this step's drafts. With one depth the
window is the last step's two slots.

Holes cost cache entries: a step uses K + 1 slots and gains each row 1 to K + 1 tokens. When the cache has
no room left for the worst case (every later draft rejected), the loop verifies the pending token alone,
one slot per token, until the end.

A framework supplies `SpeculativeSteps` (prefill / draft / verify on its model and caches); `speculative_loop`
is the rest: EOS and the token budget are checked on every committed token, and `SpeculativeStats` counts
drafted and accepted tokens. Sampling (its filters and coin flips) happens here, in numpy float64, from the
logits the framework returns, so both frameworks draw the same samples from the same seed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from dsv3.generation import check_logits_finite, left_pad

SPECULATIVE_KINDS = ("mtp",)


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation, summed over rows (finished rows are not counted).

    drafted: MTP drafts verified (K per row and step; forced prompt tokens excluded); accepted: drafts the main
    model accepted; row_steps: (row, verify step) pairs that drafted; verify_calls: main-model calls after the
    prefill; tokens: new tokens returned.
    """

    drafted: int = 0
    accepted: int = 0
    row_steps: int = 0
    verify_calls: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (nan before any draft)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per row per verify step, the verifier's own token included: 1 + accepted / row_steps
        (nan before any draft)."""
        return 1.0 + self.accepted / self.row_steps if self.row_steps else float("nan")


class SpeculativeSteps(Protocol):
    """A framework's model calls. Each returns numpy arrays: greedy, the argmax token ids; sampling, the float
    logits; and a bool array, whether each row's logits were all finite.

    depths: K, the MTP depths that draft.
    prefill(tokens [B][P], mask [B][P] or None) -> (out at slot P - 1 [B] | [B,V], finite [B]): the main model
        on the left-padded prompts (mask: 1 = real token); keeps its hidden at every slot it fills.
    draft(k, tokens [B][n], start_pos, valid [B][n]) -> (out [B] | [B,V], finite [B]): depth k (1-based) on
        the slots start_pos .. start_pos + n - 1 (valid: 1 = a real slot, 0 = a hole or padding) with the
        previous depth's hidden there (depth 1: the main model's kept hidden; depth k > 1: that of the last
        draft call, on the same slots) and the embeddings of `tokens`; its prediction from each row's last
        valid slot. Depth 1 first marks the main cache's slots with `valid` (0 turns a rejected draft into a
        hole).
    verify(tokens [B][S], start_pos) -> (out [B,S] | [B,S,V], finite [B]); real tokens; keeps the hidden.
    draft_verify(codes [K][B][n], start_pos, valid, pending [B], pos) -> (drafts [B,K], out [B,K+1],
        finite [B]), greedy only: draft(k, ...) for k = 1 .. K with depth k's tokens `codes[k - 1]`, where a
        code -i stands for the draft d_i of depth i < k (its argmax), then verify([[pending[b], *d[b]]], pos);
        finite covers every call.
    """

    depths: int

    def prefill(self, tokens: list[list[int]], mask: Optional[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]: ...

    def draft(self, k: int, tokens: list[list[int]], start_pos: int,
              valid: list[list[int]]) -> tuple[np.ndarray, np.ndarray]: ...

    def verify(self, tokens: list[list[int]], start_pos: int) -> tuple[np.ndarray, np.ndarray]: ...

    def draft_verify(self, codes: list[list[list[int]]], start_pos: int, valid: list[list[int]],
                     pending: list[int], pos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


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


def cache_slots(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_positions: int, depths: int = 1) -> int:
    """Cache entries for `speculative_loop` with `depths` drafts per step: room for a hole per draft and new
    token (the longest prompt + (depths + 1) per new token), within the model's positions; never fewer than
    plain decoding needs."""
    P = max(map(len, prompts))
    return max(P + max_new_tokens, min(P + (depths + 1) * max_new_tokens, max_positions))


def resolve_codes(codes: list[list[int]], drafts) -> list[list[int]]:
    """A depth's feed codes [B][n] (`_Slots.window`: -i stands for the draft d_i) -> token ids, drafts[b] holding
    row b's d_1, d_2, ..."""
    return [[c if c >= 0 else int(drafts[b][-c - 1]) for c in row] for b, row in enumerate(codes)]


def window_width(depths: int) -> int:
    """W = K (K + 1): the slots of the last K steps, which hold every MTP cache entry that is not final."""
    return depths * (depths + 1)


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
    K = steps.depths
    tokens, mask = left_pad(prompts)
    P = len(tokens[0])
    out, finite = steps.prefill(tokens, mask)
    check_logits_finite(finite.tolist(), P - 1)
    x = run.commit(run.pick(out))  # the pending token of every row, at slot P
    slots = _Slots(tokens, mask or [[1] * P for _ in tokens], x)
    pos, lo, drafting = P, 0, True
    while not all(run.done):
        # a step takes K + 1 slots and may gain a row only one token: draft while the rest still fits
        if drafting and cache_len - (pos + K + 1) < run.most_left() - 1:
            drafting = False
            if pos > P:  # the last step's holes are marked by a depth-1 draft call; its draft is not needed
                steps.draft(1, *slots.window(lo, pos, 1))
        if not drafting:  # the pending token alone, one slot per token (the MTP depths are not needed again)
            out, finite = steps.verify([[t] for t in x], pos)
            run.stats.verify_calls += 1
            check_logits_finite(finite.tolist(), pos)
            x, pos = run.commit(run.pick(out[:, 0])), pos + 1
            continue
        d, q, out = run.draft_and_verify(slots, lo, x, pos)
        new = run.judge(d, q, out)
        for b in range(run.B):  # each row commits its accepted drafts and its correction or bonus token
            for t in new[b]:
                run.emit(b, t)
        x = [row[-1] for row in new]
        slots.extend(d, [len(row) - 1 for row in new], x)
        pos += K + 1
        lo = max(0, pos - window_width(K))
    return run.new


class _Slots:
    """Per row, the token and the validity (1 real, 0 padding or hole) of every slot up to the pending one, and
    the indices of its real slots (the pending one last)."""

    def __init__(self, tokens: list[list[int]], mask: list[list[int]], pending: list[int]):
        self.tok = [row + [x] for row, x in zip(tokens, pending)]
        self.ok = [list(m) + [1] for m in mask]
        self.real = [[i for i, v in enumerate(ok) if v] for ok in self.ok]

    def extend(self, drafts, accepted: list[int], pending: list[int]) -> None:
        """After a step: the drafts at the slots after the old pending one (the first accepted[b] real, the
        rest holes), then the new pending token."""
        for b, (row, a, x) in enumerate(zip(drafts, accepted, pending)):
            s = len(self.tok[b])
            self.tok[b] += [int(t) for t in row] + [x]
            self.ok[b] += [1] * a + [0] * (len(row) - a) + [1]
            self.real[b] += [*range(s, s + a), s + len(row)]

    def window(self, lo: int, pos: int, k: int) -> tuple[list[list[int]], int, list[list[int]]]:
        """Depth k's feed for the slots lo .. pos - 1 -> (codes [B][n], lo, valid [B][n]): at a real slot,
        the token k real positions later, or -i for the draft d_i where that lies i positions past the
        pending token; 0 at a hole or pad."""
        codes = []
        for tok, ok, real in zip(self.tok, self.ok, self.real):
            row, j = [0] * (pos - lo), bisect.bisect_left(real, lo)  # j: the rank of the first real slot >= lo
            for i in real[j:-1]:  # the real slots of the window (the pending one is past it)
                r = j + k  # the real position whose token slot i's entry embeds
                row[i - lo] = tok[real[r]] if r < len(real) else -(r - len(real) + 1)
                j += 1
            codes.append(row)
        return codes, lo, [ok[lo:pos] for ok in self.ok]


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

    def draft_and_verify(self, slots: _Slots, lo: int, x: list[int], pos: int):
        """Draft d_1 .. d_K (each depth fed over the window lo .. pos - 1) and verify [x, d_1 .. d_K] at pos
        -> (drafts d [B][K], the drafts' probabilities q [K][B,V] or None (greedy), verifier output)."""
        K = self.steps.depths
        if self.greedy:  # the drafts never leave the device: one call drafts and verifies
            feeds = [slots.window(lo, pos, k) for k in range(1, K + 1)]
            d, out, finite = self.steps.draft_verify([f[0] for f in feeds], lo, feeds[0][2], x, pos)
            q = None
        else:
            d, q = [[] for _ in range(self.B)], []
            for k in range(1, K + 1):
                codes, _, valid = slots.window(lo, pos, k)
                q_out, finite = self.steps.draft(k, resolve_codes(codes, d), lo, valid)
                check_logits_finite(finite.tolist(), pos + k)
                q.append(self.probs(q_out))
                for b in range(self.B):
                    d[b].append(sample(q[-1][b], self.rng))
            out, finite = self.steps.verify([[x[b], *d[b]] for b in range(self.B)], pos)
        self.stats.verify_calls += 1
        check_logits_finite(finite.tolist(), pos + K)
        return [[int(t) for t in row] for row in d], q, out

    def judge(self, d, q, out) -> list[list[int]]:
        """Accept each row's drafts up to its first rejection -> per row the new tokens: the accepted drafts
        and then the correction (at the rejection) or the verifier's bonus token (all accepted)."""
        new = []
        for b in range(self.B):
            row = []
            for i, t in enumerate(d[b]):
                if self.greedy:
                    ok, y = int(out[b, i]) == t, int(out[b, i])
                else:
                    ok, y = accept_or_resample(self.probs(out[b, i]), q[i][b], t, self.rng)
                if not ok:
                    row.append(y)
                    break
                row.append(t)
            else:  # every draft accepted: the bonus token after the last
                row.append(self.pick(out[b:b + 1, len(d[b])])[0])
            if not self.done[b]:
                self.stats.drafted += len(d[b])
                self.stats.accepted += len(row) - 1
                self.stats.row_steps += 1
            new.append(row)
        return new
