"""dsv3.speculative: the acceptance rule, the filters, the statistics; torch and JAX speculative decoding agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dsv3.speculative import (SpeculativeStats, accept_or_resample, check_speculative, filtered_probs,
                              sample)


def test_accept_or_resample_returns_the_target_distribution():
    """d ~ q, then the rule: the returned token follows p exactly (chi-square, 20000 draws, false-failure rate
    1e-4, fixed seed). q puts mass where p has none and vice versa; the acceptance rate is sum(min(p, q))."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2, 0.0, 0.0])
    q = np.array([0.1, 0.1, 0.3, 0.4, 0.1])
    n, acc = 20000, 0
    counts = np.zeros(5, int)
    for _ in range(n):
        d = sample(q, rng)
        ok, t = accept_or_resample(p, q, d, rng)
        acc += ok
        counts[t] += 1
    assert counts[3] == counts[4] == 0
    assert sps.chisquare(counts[:3], p[:3] * n).pvalue > 1e-4
    assert abs(acc / n - np.minimum(p, q).sum()) < 4 * math.sqrt(0.4 * 0.6 / n)  # 4 sigma
    assert accept_or_resample(p, p, 1, rng) == (True, 1)  # q == p: always accepted


def test_filtered_probs_follow_sample_next():
    """Temperature, top-k (ties kept), top-p (a token is dropped once the mass before it reaches top_p)."""
    logits = np.log(np.array([[0.5, 0.25, 0.125, 0.125]]))
    np.testing.assert_allclose(filtered_probs(logits, 1.0, None, None), [[0.5, 0.25, 0.125, 0.125]])
    np.testing.assert_allclose(filtered_probs(logits, 1.0, 1, None), [[1, 0, 0, 0]])
    np.testing.assert_allclose(filtered_probs(logits, 1.0, 3, None), [[0.5, 0.25, 0.125, 0.125]])  # tie kept
    np.testing.assert_allclose(filtered_probs(logits, 1.0, None, 0.75), [[2 / 3, 1 / 3, 0, 0]])
    np.testing.assert_allclose(filtered_probs(logits, 1.0, None, 0.7), [[2 / 3, 1 / 3, 0, 0]])
    np.testing.assert_allclose(filtered_probs(logits, 0.5, None, None)[0, :2] * (1 / 4 + 1 / 16 + 2 / 64),
                               [1 / 4, 1 / 16])


def test_stats_and_argument_checks():
    st = SpeculativeStats(drafted=10, accepted=8, row_steps=10, verify_calls=10, tokens=18)
    assert st.acceptance_rate == 0.8 and st.mean_accepted_length == 1.8
    st = SpeculativeStats(drafted=20, accepted=12, row_steps=10, verify_calls=10, tokens=22)  # two depths
    assert st.acceptance_rate == 0.6 and st.mean_accepted_length == 2.2
    assert math.isnan(SpeculativeStats().acceptance_rate)
    with pytest.raises(ValueError, match="speculative: must be one of"):
        check_speculative("medusa", 1)
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        check_speculative("mtp", 0)


def test_torch_and_jax_give_the_same_tokens_and_acceptance_counts():
    """One checkpoint in both frameworks: greedy speculative decoding gives the same tokens (plain greedy's)
    and the same drafted / accepted / verify counts."""
    import torch
    from flax import nnx

    import dsv3_jax
    import dsv3_torch
    from dsv3.config import ModelConfig
    from dsv3_jax.speculative import speculative_generate as jax_spec
    from dsv3_torch.speculative import speculative_generate as torch_spec

    # a dense, a MoE and two MTP blocks: each step drafts a chain of two tokens
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=2)
    torch.manual_seed(0)
    tm = dsv3_torch.DeepSeekV3(cfg)
    with torch.no_grad():  # drafts that agree with the main model part of the time
        for mod in tm.mtp:
            mod.eh_proj.weight[:, :cfg.hidden_size] += torch.eye(cfg.hidden_size)
    jm = dsv3_jax.DeepSeekV3(cfg, nnx.Rngs(1))
    jm.load_canonical_state(tm.canonical_state())
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    ts, js = SpeculativeStats(), SpeculativeStats()
    out = torch_spec(tm, prompts, 12, stats=ts)
    assert jax_spec(jm, prompts, 12, stats=js) == out == dsv3_torch.generate(tm, prompts, 12)
    assert ts == js and 0 < ts.accepted < ts.drafted == 2 * ts.row_steps
