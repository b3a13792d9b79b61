"""Speculative decoding with the MTP depth as the draft (dsv3_torch.speculative, dsv3.speculative)."""

import numpy as np
import pytest
import torch

import dsv3_torch
from dsv3 import ModelConfig
from spec_sampling import assert_samples_follow
from dsv3.speculative import SpeculativeStats, filtered_probs
from dsv3_torch.speculative import SpeculativeSteps, speculative_generate

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]


def drafting_model(cfg=None) -> dsv3_torch.DeepSeekV3:
    """A random tiny model whose MTP depths agree with the main model part of the time: each eh_proj gets
    the identity on its embedding half (with random-init blocks, the main model's next token is mostly a
    function of the current token, so a draft from embed(t+1) often matches)."""
    cfg = cfg or ModelConfig.preset("tiny")
    torch.manual_seed(0)
    m = dsv3_torch.DeepSeekV3(cfg)
    D = cfg.hidden_size
    with torch.no_grad():
        for mod in m.mtp:
            mod.eh_proj.weight[:, :D] += torch.eye(D)
    return m


@pytest.fixture(scope="module")
def model():
    return drafting_model()


@pytest.fixture(scope="module")
def model2():
    """Two MTP depths, each drafting from the identity on its embedding half."""
    return drafting_model(ModelConfig.preset("tiny").replace(num_nextn_predict_layers=2))


def _timed(model, prompts, n, **kw):
    """speculative_generate, also returning per row the verify call each token was committed in."""
    st = SpeculativeStats()
    when = [[] for _ in prompts]
    out = speculative_generate(model, prompts, n, stats=st, on_token=lambda b, t: when[b].append(st.verify_calls),
                               **kw)
    return out, when, st


@pytest.mark.parametrize("kind,depths", [("latent", 1), ("naive", 1), ("latent", 2)])
def test_greedy_equals_plain_greedy_batched_and_per_row(model, model2, kind, depths):
    m = model if depths == 1 else model2
    ref = dsv3_torch.generate(m, PROMPTS, 12, cache=kind)
    out, when, st = _timed(m, PROMPTS, 12, cache=kind)
    assert out == ref
    assert 0 < st.accepted < st.drafted  # both paths taken
    assert st.drafted == depths * st.row_steps
    # some verify call committed every draft of a row and its bonus token
    assert max(w.count(c) for w in when for c in set(w)) == depths + 1
    plain_steps = max(map(len, PROMPTS)) + 12 - min(map(len, PROMPTS)) - 1  # decode_loop's calls after prefill
    assert st.verify_calls < plain_steps
    assert st.tokens == sum(map(len, ref))
    alone = [_timed(m, [p], 12, cache=kind) for p in PROMPTS]
    assert [a[0][0] for a in alone] == ref
    # per-row acceptance: each row of the batch accepts exactly the drafts it accepts alone, and the batch
    # takes as many verify calls as its slowest row
    assert (st.drafted, st.accepted) == tuple(sum(getattr(a[2], k) for a in alone) for k in ("drafted", "accepted"))
    assert st.verify_calls == max(a[2].verify_calls for a in alone)


def test_draft_equals_the_training_mtp_forward(model2):
    """Both depths' cached drafts at positions 3, 5, 6 and 8 are the MTP logits of the full forward as
    compute_loss computes them (depth 1: hidden after the final norm and embed(t_{i+1}); depth 2: depth 1's
    hidden and embed(t_{i+2})): after a prefill of 4, a verify of 2, a verify of 2 whose second entry is
    rejected (a hole in every cache), then a verify of 2 after the hole. Each draft call feeds a window of 4
    slots that overlaps the last one's (entries recomputed, as the loop does) and embeds, at each real slot,
    the token 1 or 2 real positions later (after a hole: one slot further)."""
    m = model2
    x = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        h, _ = m.hidden(x)
        cos, sin = m._rope(0, 12, x.device)
        want = []
        for k, mod in enumerate(m.mtp, start=1):
            h, _ = mod(h, m.embed(torch.cat([x[:, k:], torch.zeros_like(x[:, :k])], 1)), cos, sin)
            want.append(m.head(mod.norm(h)).numpy())
    steps = SpeculativeSteps(m, 2, 12, greedy=False)
    t = x.tolist()

    def draft(start, slots, pos):
        """Both depths on the slots start.. holding the real positions `slots` (None: a hole)."""
        valid = [[int(j is not None) for j in slots]] * 2
        return [steps.draft(k, [[r[j + k] if j is not None else 0 for j in slots] for r in t], start, valid)[0]
                for k in (1, 2)]

    steps.prefill([r[:4] for r in t], None)
    got = {3: draft(0, [0, 1, 2, 3], 3)}
    steps.verify([r[4:6] for r in t], 4)
    got[5] = draft(2, [2, 3, 4, 5], 5)
    steps.verify([[r[6], 0] for r in t], 6)  # entry 7 holds a draft that is then rejected
    got[6] = draft(4, [4, 5, 6, None], 6)
    steps.verify([r[7:9] for r in t], 8)  # positions 7 and 8 at entries 8 and 9
    got[8] = draft(6, [6, None, 7, 8], 8)
    for i, g in got.items():
        for k in (0, 1):
            np.testing.assert_allclose(g[k], want[k][:, i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("depths", [1, 2])
def test_eos_and_max_new_tokens_cut_mid_acceptance(model, model2, depths):
    """Every cut point of the greedy output: the result is plain greedy's, cut. At least one cut lands on an
    accepted draft whose bonus token (committed in the same verify call) is dropped."""
    model = model if depths == 1 else model2
    ref = dsv3_torch.generate(model, PROMPTS, 12)
    _, when, _ = _timed(model, PROMPTS, 12)
    mid = 0
    for n in range(1, 12):
        assert speculative_generate(model, PROMPTS, n) == [r[:n] for r in ref]
        mid += any(w[n - 1] == w[n] for w in when)
    assert mid > 0
    row, mid = ref[0], 0
    for i, eos in enumerate(row):
        if eos in row[:i]:
            continue
        want = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
        assert speculative_generate(model, PROMPTS, 12, eos=eos) == want
        mid += i + 1 < len(row) and when[0][i] == when[0][i + 1]
    assert mid > 0


@pytest.mark.parametrize("depths,vocab", [(1, 8), (2, 4)])
def test_sampling_matches_the_main_models_distribution(depths, vocab):
    """A vocabulary of 8 (one depth) or 4 (two), 6000 rows of one prompt, 1 + depths new tokens: the first from
    the prefill, the others from the draft/verify rule (with two depths, the second draft is conditioned on a
    sampled first). The empirical joint of the tokens against the main model's exact
    p(t1) p(t2 | t1) ... (temperature 0.8, top-k vocab - 2: cells outside the filter must stay empty).
    Chi-square at a 1e-4 false-failure rate (fixed seed, so the result is deterministic)."""
    import itertools

    cfg = ModelConfig.preset("tiny").replace(vocab_size=vocab, num_nextn_predict_layers=depths)
    torch.manual_seed(0)
    m = dsv3_torch.DeepSeekV3(cfg)  # a random draft: q far from p
    with torch.no_grad():
        m.head.weight.mul_(5)  # distributions far from uniform
    prompt, kw = [3, 1, 2], dict(temperature=0.8, top_k=vocab - 2, top_p=None)
    exact = np.ones(1)
    with torch.no_grad():
        for n in range(depths + 1):  # p(t_{n+1} | prompt, t_1 .. t_n) for every prefix, times the prefix's
            ext = torch.tensor([prompt + list(c) for c in itertools.product(range(vocab), repeat=n)])
            exact = (exact[:, None] * filtered_probs(m(ext)[:, -1].numpy(), **kw)).ravel()
    N = 6000
    st = SpeculativeStats()
    out = speculative_generate(m, [prompt] * N, depths + 1, seed=1, stats=st, **kw)
    assert_samples_follow(out, exact, st, vocab)


def test_bad_arguments_and_non_finite_logits_raise(model):
    from dsv3.generation import NonFiniteLogits

    with pytest.raises(ValueError, match="speculative: must be one of"):
        speculative_generate(model, PROMPTS, 3, speculative="medusa")
    with pytest.raises(ValueError, match="top_k"):
        speculative_generate(model, PROMPTS, 3, temperature=1.0, top_k=0)
    no_mtp = dsv3_torch.DeepSeekV3(model.cfg.replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        speculative_generate(no_mtp, PROMPTS, 3)
    assert speculative_generate(model, PROMPTS, 0) == [[], [], []]
    broken = drafting_model()
    with torch.no_grad():
        broken.mtp[0].norm.weight.fill_(float("nan"))  # the draft's logits only: the main model is fine
    for temperature in (0.0, 1.0):
        with pytest.raises(NonFiniteLogits):
            speculative_generate(broken, PROMPTS, 3, temperature=temperature)
