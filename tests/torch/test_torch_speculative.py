"""Speculative decoding with the MTP depth as the draft (dsv3_torch.speculative, dsv3.speculative)."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats as sps

import dsv3_torch
from dsv3 import ModelConfig
from dsv3.speculative import SpeculativeStats, filtered_probs
from dsv3_torch.speculative import SpeculativeSteps, speculative_generate

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]


def drafting_model(cfg=None) -> dsv3_torch.DeepSeekV3:
    """A random tiny model whose MTP depth agrees with the main model about half of the time: eh_proj gets
    the identity on its embedding half (with random-init blocks, the main model's next token is mostly a
    function of the current token, so a draft from embed(t+1) often matches)."""
    cfg = cfg or ModelConfig.preset("tiny")
    torch.manual_seed(0)
    m = dsv3_torch.DeepSeekV3(cfg)
    D = cfg.hidden_size
    with torch.no_grad():
        m.mtp[0].eh_proj.weight[:, :D] += torch.eye(D)
    return m


@pytest.fixture(scope="module")
def model():
    return drafting_model()


def _timed(model, prompts, n, **kw):
    """speculative_generate, also returning per row the verify call each token was committed in."""
    st = SpeculativeStats()
    when = [[] for _ in prompts]
    out = speculative_generate(model, prompts, n, stats=st, on_token=lambda b, t: when[b].append(st.verify_calls),
                               **kw)
    return out, when, st


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_greedy_equals_plain_greedy_batched_and_per_row(model, kind):
    ref = dsv3_torch.generate(model, PROMPTS, 12, cache=kind)
    out, when, st = _timed(model, PROMPTS, 12, cache=kind)
    assert out == ref
    assert 0 < st.accepted < st.drafted  # both paths taken
    plain_steps = max(map(len, PROMPTS)) + 12 - min(map(len, PROMPTS)) - 1  # decode_loop's calls after prefill
    assert st.verify_calls < plain_steps
    assert st.tokens == sum(map(len, ref))
    alone = [_timed(model, [p], 12, cache=kind) for p in PROMPTS]
    assert [a[0][0] for a in alone] == ref
    # per-row acceptance: each row of the batch accepts exactly the drafts it accepts alone, and the batch
    # takes as many verify calls as its slowest row
    assert (st.drafted, st.accepted) == tuple(sum(getattr(a[2], k) for a in alone) for k in ("drafted", "accepted"))
    assert st.verify_calls == max(a[2].verify_calls for a in alone)


def test_draft_equals_the_training_mtp_forward(model):
    """The cached draft at positions 3, 5, 6 and 8 is the MTP logits of the full forward as compute_loss computes
    them (hidden after the final norm, embed(t_{i+1}) first): after a prefill of 4, a verify of 2, a verify of 2
    whose second entry is rejected (a hole in both caches), then a verify of 2 after the hole."""
    x = torch.randint(0, model.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        h, _ = model.hidden(x)
        cos, sin = model._rope(0, 10, x.device)
        emb = model.embed(torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1))
        hk, _ = model.mtp[0](h, emb, cos, sin)
        want = model.head(model.mtp[0].norm(hk)).numpy()
    steps = SpeculativeSteps(model, 2, 11, greedy=False)
    t = x.tolist()
    steps.prefill([r[:4] for r in t], None)
    got = {3: steps.draft([r[1:5] for r in t], 0, [[1] * 4] * 2)[0]}
    steps.verify([r[4:6] for r in t], 4)
    got[5] = steps.draft([r[5:7] for r in t], 4, [[1, 1]] * 2)[0]
    steps.verify([[r[6], 0] for r in t], 6)  # entry 7 holds a draft that is then rejected
    got[6] = steps.draft([[r[7], r[7]] for r in t], 6, [[1, 0]] * 2)[0]
    steps.verify([r[7:9] for r in t], 8)  # positions 7 and 8 at entries 8 and 9
    got[8] = steps.draft([r[8:10] for r in t], 8, [[1, 1]] * 2)[0]
    for i, g in got.items():
        np.testing.assert_allclose(g, want[:, i], rtol=0, atol=1e-5)


def test_eos_and_max_new_tokens_cut_mid_acceptance(model):
    """Every cut point of the greedy output: the result is plain greedy's, cut. At least one cut lands on an
    accepted draft whose bonus token (committed in the same verify call) is dropped."""
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


def test_sampling_matches_the_main_models_distribution():
    """Vocabulary 8, 6000 rows of one prompt, two new tokens: the first from the prefill, the second from the
    draft/verify rule. The empirical joint of the pair against the main model's exact p(t1) p(t2 | t1)
    (temperature 0.8, top-k 6: cells outside the filter must stay empty). Chi-square at a 1e-4 false-failure
    rate (fixed seed, so the result is deterministic)."""
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=8)
    torch.manual_seed(0)
    m = dsv3_torch.DeepSeekV3(cfg)  # a random draft: q far from p
    with torch.no_grad():
        m.head.weight.mul_(5)  # distributions far from uniform
    prompt, kw = [3, 1, 4], dict(temperature=0.8, top_k=6, top_p=None)
    with torch.no_grad():
        p1 = filtered_probs(m(torch.tensor([prompt]))[0, -1].numpy(), **kw)
        ext = torch.tensor([prompt + [t] for t in range(8)])
        p2 = filtered_probs(m(ext)[:, -1].numpy(), **kw)
    exact = (p1[:, None] * p2).ravel()
    N = 6000
    st = SpeculativeStats()
    out = speculative_generate(m, [prompt] * N, 2, seed=1, stats=st, **kw)
    assert 0.2 < st.acceptance_rate < 0.95  # both accept and resample paths are exercised
    counts = np.bincount([a * 8 + b for a, b in out], minlength=64)
    assert counts[exact == 0].sum() == 0
    keep = exact * N >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(exact[keep], exact[~keep].sum()) * N
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert sps.chisquare(obs, exp).pvalue > 1e-4


def test_bad_arguments_and_non_finite_logits_raise(model):
    from dsv3.generation import NonFiniteLogits

    with pytest.raises(ValueError, match="speculative: must be one of"):
        speculative_generate(model, PROMPTS, 3, speculative="medusa")
    with pytest.raises(ValueError, match="top_k"):
        speculative_generate(model, PROMPTS, 3, temperature=1.0, top_k=0)
    no_mtp = dsv3_torch.DeepSeekV3(dataclasses.replace(model.cfg, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        speculative_generate(no_mtp, PROMPTS, 3)
    assert speculative_generate(model, PROMPTS, 0) == [[], [], []]
    broken = drafting_model()
    with torch.no_grad():
        broken.mtp[0].norm.weight.fill_(float("nan"))  # the draft's logits only: the main model is fine
    for temperature in (0.0, 1.0):
        with pytest.raises(NonFiniteLogits):
            speculative_generate(broken, PROMPTS, 3, temperature=temperature)
