"""dsv3_jax: attention_mask (1 = real token, 0 = padding) in the forward, the loss, the router counts,
the cache and generation; static shapes under jit.

Compiled programs are the cost here, so shapes are shared: the 2-layer tiny model (one dense and one MoE layer,
the MTP block's MoE) of test_model.py and test_jax_speculative.py, one padded batch (rows of 9, 5 and 2 tokens)
for the forward, the all-ones mask and the cached prefill, and generation in the buckets of the other files."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3.config import ModelConfig
from dsv3_jax import DeepSeekV3, generate

CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=2)  # as test_model.py: shared programs
PAD = 7  # any id: padded tokens must not matter
# One xdist worker for the files that run these programs (test_model.py, test_padding.py,
# test_jax_speculative.py, tests/test_generate_args.py): each compiles them once.
pytestmark = pytest.mark.xdist_group("jax_tiny_2layer")


@pytest.fixture(scope="module")
def model():
    m = DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for r in m.routers():  # non-zero bias, as after training
        r.bias[...] = jnp.asarray(rng.normal(0, 0.05, CFG.n_routed_experts), jnp.float32)
    for layer in m.layers:  # far from uniform attention, so a leak through a padded key shows
        layer.attn.wkv_b.kernel[...] = layer.attn.wkv_b.kernel[...] * 20
        layer.attn.wq_b.kernel[...] = layer.attn.wq_b.kernel[...] * 20
    return m


ROWS = (9, 5, 2)  # the padded batch [3, 9] of the forward tests
LOSS_ROWS = (12, 7, 4)  # the padded batch [3, 12] of the loss and router-count tests


def _rows(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def _pad(rows, side):
    L = max(map(len, rows))
    toks, mask = [], []
    for r in rows:
        p = L - len(r)
        toks.append([PAD] * p + r if side == "left" else r + [PAD] * p)
        mask.append([0] * p + [1] * len(r) if side == "left" else [1] * len(r) + [0] * p)
    return jnp.asarray(toks, jnp.int32), jnp.asarray(mask, jnp.int32)


_loss = nnx.jit(lambda m, a, b, am: m.compute_loss(a, b, am))
_hidden = nnx.jit(lambda m, t, am: m.hidden(t, attention_mask=am))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_equal_each_row_alone(model, side):
    rows = _rows(ROWS)
    tokens, mask = _pad(rows, side)
    out = np.asarray(model(tokens, attention_mask=mask))
    assert np.isfinite(out).all()  # padded rows too (a fully padded query row sees itself)
    m = np.asarray(mask).astype(bool)
    for b, r in enumerate(rows):
        alone = np.asarray(model(jnp.asarray([r], jnp.int32)))[0]
        np.testing.assert_allclose(out[b][m[b]], alone, rtol=0, atol=1e-5)


def test_all_ones_mask_agrees_with_no_mask(model):
    x = jnp.asarray(_rows([max(ROWS)] * len(ROWS), seed=9), jnp.int32)  # the shape of the padded batch
    np.testing.assert_allclose(np.asarray(model(x, attention_mask=jnp.ones_like(x))), np.asarray(model(x)),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=jnp.ones((3, 8), jnp.int32))


def _loss_alone(model, rows):
    """Loss terms of rows of different lengths from the rows alone: CE terms token-weighted, balance averaged."""
    parts = [(_loss(model, jnp.asarray([r], jnp.int32), jnp.asarray([r], jnp.int32), None), len(r)) for r in rows]
    main = sum(float(o.main_loss) * n for o, n in parts) / sum(n for _, n in parts)
    mtp = [sum(float(o.mtp_losses[k]) * max(n - k - 1, 0) for o, n in parts) / sum(max(n - k - 1, 0) for _, n in parts)
           for k in range(CFG.num_nextn_predict_layers)]
    bal = sum(float(o.balance_loss) for o, _ in parts) / len(parts)
    counts = sum(np.asarray(o.counts) for o, _ in parts)
    return main, np.asarray(mtp), bal, counts


@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_loss_equals_unpadded_loss(model, side):
    rows = _rows(LOSS_ROWS, seed=2)
    tokens, mask = _pad(rows, side)
    out = _loss(model, tokens, tokens, mask)  # the pad labels are NOT -100: the mask alone drops them
    main, mtp, bal, counts = _loss_alone(model, rows)
    assert np.isfinite(float(out.loss))
    assert abs(float(out.main_loss) - main) <= 1e-6
    np.testing.assert_allclose(np.asarray(out.mtp_losses), mtp, rtol=0, atol=1e-6)
    assert abs(float(out.balance_loss) - bal) <= 1e-6
    np.testing.assert_array_equal(np.asarray(out.counts), counts)  # router counts: real tokens only, exact


def test_router_counts_with_padding_equal_the_real_tokens_alone(model):
    """hidden()'s per-layer counts of a padded batch against each row alone, counted by the unpadded loss
    forward (its counts: one row per router, the main MoE layers first): the rows and the programs of
    test_masked_loss_equals_unpadded_loss."""
    rows = _rows(LOSS_ROWS, seed=2)
    tokens, mask = _pad(rows, "left")
    _, moe = _hidden(model, tokens, mask)  # jitted: one program per shape, not one per op
    alone = [np.asarray(_loss(model, jnp.asarray([r], jnp.int32), jnp.asarray([r], jnp.int32), None).counts)
             for r in rows]
    assert len(moe) == len(alone[0]) - CFG.num_nextn_predict_layers > 0  # the main MoE layers, then the MTP's
    for i, o in enumerate(moe):
        np.testing.assert_array_equal(np.asarray(o.counts), sum(a[i] for a in alone))


def test_masked_loss_gradient_is_finite(model):
    rows = _rows([8, 5], seed=5)
    tokens, mask = _pad(rows, "left")
    g = nnx.jit(nnx.grad(lambda m, a, am: m.compute_loss(a, a, am).loss))(model, tokens, mask)
    leaves = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(nnx.state(g))]
    assert leaves and all(np.isfinite(x).all() for x in leaves)


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_left_padded_batched_greedy_generation_equals_each_prompt_alone(model, kind):
    """Every prompt is shorter than the prefill bucket of 8, so each is padded further on the left both in the
    batch and alone: one prefill and one decode program for the batch of 3 and one each for a prompt alone
    (the programs of test_model.py's generation tests)."""
    prompts = _rows([1, 7, 3], seed=6)
    got = generate(model, prompts, 6, cache=kind)
    for p, g in zip(prompts, got):
        assert g == generate(model, [p], 6, cache=kind)[0]


def test_cached_prefill_with_mask_then_steps_equal_the_full_padded_forward(model):
    rows = _rows(ROWS, seed=7)  # the shape of the forward tests: the full padded forward is their program
    tokens, mask = _pad(rows, "left")
    step = nnx.jit(lambda m, t, c, p, am: m.forward_cached(t, c, p, am))
    cache = model.init_cache(3, 12)
    a, cache = step(model, tokens[:, :5], cache, jnp.int32(0), mask[:, :5])
    b, cache = step(model, tokens[:, 5:], cache, jnp.int32(5), mask[:, 5:])
    full = np.asarray(model(tokens, attention_mask=mask))
    keep = np.asarray(mask).astype(bool)
    got = np.concatenate([np.asarray(a), np.asarray(b)], 1)
    np.testing.assert_allclose(got[keep], full[keep], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :9], keep)
    traces = []
    g = nnx.jit(lambda m, t, c, p: (traces.append(1), m.forward_cached(t, c, p))[1])
    for p in range(9, 12):  # decode steps on the masked cache: one compile, traced position
        _, cache = g(model, tokens[:, -1:], cache, jnp.int32(p))
    assert len(traces) == 1
