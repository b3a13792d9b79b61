"""dsv3_jax speculative decoding with the MTP depth as the draft (dsv3_jax.speculative, dsv3.speculative).

The 2-layer tiny model of test_model.py and test_padding.py (one dense and one MoE layer, the MTP block's MoE):
plain greedy generation here runs their compiled programs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3.config import ModelConfig
from spec_sampling import assert_samples_follow
from dsv3.speculative import SpeculativeStats, filtered_probs
from dsv3_jax import DeepSeekV3, generate
from dsv3.generation import cache_length
from dsv3_jax.speculative import SpeculativeSteps, speculative_generate

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
# One xdist worker for the files that run these programs (test_model.py, test_padding.py,
# test_jax_speculative.py, tests/test_generate_args.py): each compiles them once.
pytestmark = pytest.mark.xdist_group("jax_tiny_2layer")


def drafting_model(cfg=None) -> DeepSeekV3:
    """A random tiny model whose MTP depth agrees with the main model part of the time: eh_proj gets the
    identity on its embedding half (with random-init blocks, the main model's next token is mostly a
    function of the current token, so a draft from embed(t+1) often matches)."""
    cfg = cfg or CFG
    m = DeepSeekV3(cfg, nnx.Rngs(0))
    D = cfg.hidden_size
    k = m.mtp[0].eh_proj.kernel
    k[...] = k[...].at[:D].add(jnp.eye(D, dtype=k[...].dtype))  # kernel [2D, D]: rows 0..D-1 act on the embedding
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


@pytest.fixture(scope="module")
def ref(model):
    return generate(model, PROMPTS, 12)


@pytest.fixture(scope="module")
def timed(model):
    return _timed(model, PROMPTS, 12)


# Every call below keeps batch 3 and the bucketed cache length of 20 (PROMPTS, 12 new tokens; any budget up to
# 12 shares it) where it can: each other shape compiles the draft and verify programs again.


def test_greedy_equals_plain_greedy(ref, timed):
    out, when, st = timed
    assert out == ref
    assert 0 < st.accepted < st.drafted  # both paths taken
    assert st.verify_calls < max(map(len, PROMPTS)) + 12 - min(map(len, PROMPTS)) - 1  # decode_loop's calls
    assert st.tokens == sum(map(len, ref))


def test_draft_equals_the_training_mtp_forward(model):
    """The cached draft at positions 1, 3, 4 and 6 is the MTP logits of the full forward as compute_loss computes
    them (hidden after the final norm, embed(t_{i+1}) first): after a prefill of 2, a verify of 2, a verify of 2
    whose second entry is rejected (a hole in both caches), then a verify of 2 after the hole."""
    x = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (3, 8))

    @nnx.jit
    def full(m, x):
        h, _ = m.hidden(x)
        cos, sin = m.rope(jnp.arange(x.shape[1]), m.dtype)
        hk, _ = m.mtp[0](h, m.embed(jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], 1)), cos, sin)
        return m.head(m.mtp[0].norm(hk))

    want = np.asarray(full(model, jnp.asarray(x, jnp.int32)))
    steps = SpeculativeSteps(model, 3, cache_length(20), greedy=False)  # speculative_generate's cache
    t = x.tolist()
    steps.prefill([r[:2] for r in t], None)
    got = {1: steps.draft(1, [r[1:3] for r in t], 0, [[1, 1]] * 3)[0]}
    steps.verify([r[2:4] for r in t], 2)
    got[3] = steps.draft(1, [r[3:5] for r in t], 2, [[1, 1]] * 3)[0]
    steps.verify([[r[4], 0] for r in t], 4)  # entry 5 holds a draft that is then rejected
    got[4] = steps.draft(1, [[r[5], r[5]] for r in t], 4, [[1, 0]] * 3)[0]
    steps.verify([r[5:7] for r in t], 6)  # positions 5 and 6 at entries 6 and 7
    got[6] = steps.draft(1, [r[6:8] for r in t], 6, [[1, 1]] * 3)[0]
    for i, g in got.items():
        np.testing.assert_allclose(g, want[:, i], rtol=0, atol=1e-5)


def test_eos_and_max_new_tokens_cut_mid_acceptance(model, ref, timed):
    """Cuts on an accepted draft whose bonus token (committed in the same verify call) is dropped: the result
    is plain greedy's, cut. Every EOS of row 0, and one budget (its cache length shares the bucket of 12)."""
    _, when, _ = timed
    budgets = [n for n in range(1, 12) if any(w[n - 1] == w[n] for w in when)]
    assert budgets
    n = budgets[0]
    assert speculative_generate(model, PROMPTS, n) == [r[:n] for r in ref]
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
    """The torch test of the same name (tests/torch/test_torch_speculative.py) on the JAX model: 6000 rows,
    1 + depths sampled tokens against the main model's exact joint, chi-square at a 1e-4 false-failure rate."""
    import itertools

    cfg = CFG.replace(vocab_size=vocab, num_nextn_predict_layers=depths)
    m = DeepSeekV3(cfg, nnx.Rngs(0))  # a random draft: q far from p
    m.head.kernel[...] = m.head.kernel[...] * 5  # distributions far from uniform
    prompt, kw = [3, 1], dict(temperature=0.8, top_k=vocab - 2, top_p=None)
    # p(t_{n+1} | prompt, t_1 .. t_n) for every prefix of every length, from the logits of the full-length
    # continuations (causal: position len(prompt) + n - 1 sees the prompt and t_1 .. t_n only)
    full = list(itertools.product(range(vocab), repeat=depths + 1))
    logits = np.asarray(m(jnp.asarray([prompt + list(c) for c in full])))
    exact = np.ones(1)
    for n in range(depths + 1):
        first = [full.index(c + (0,) * (depths + 1 - n)) for c in itertools.product(range(vocab), repeat=n)]
        exact = (exact[:, None] * filtered_probs(logits[first, len(prompt) + n - 1], **kw)).ravel()
    N = 6000
    st = SpeculativeStats()
    out = speculative_generate(m, [prompt] * N, depths + 1, seed=1, stats=st, **kw)
    assert_samples_follow(out, exact, st, vocab)
