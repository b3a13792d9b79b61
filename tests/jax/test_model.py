"""dsv3_jax model: decoding caches, causality, errors, checkpoints, abstract v3-671b, loss, bias update.

The 2-layer tiny model (one dense and one MoE layer, the MTP block's MoE) of test_padding.py and
test_jax_speculative.py: the same compiled forward, loss and generation programs serve the three files."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3.checkpoint import CheckpointError
from dsv3.names import canonical_shapes
from dsv3.config import ModelConfig
from dsv3_jax import DeepSeekV3, RouterBias, generate

CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
# One xdist worker for the files that run these programs (test_model.py, test_padding.py,
# test_jax_speculative.py, tests/test_generate_args.py): each compiles them once.
pytestmark = pytest.mark.xdist_group("jax_tiny_2layer")


@pytest.fixture(scope="module")
def model():
    m = DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for r in m.routers():  # non-zero bias, as after training
        r.bias[...] = jnp.asarray(rng.normal(0, 0.05, CFG.n_routed_experts), jnp.float32)
    return m


@pytest.fixture(scope="module")
def tokens():
    # [3, 9]: the shape of test_padding.py's padded batch, whose unmasked forward is this program
    return jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 9)), jnp.int32)


@pytest.fixture(scope="module")
def full_logits(model, tokens):
    return np.asarray(model(tokens))


_step = nnx.jit(lambda m, t, c, p: m.forward_cached(t, c, p))
_loss = nnx.jit(lambda m, a, b: m.compute_loss(a, b))


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_cached_decoding_equals_full_forward(model, tokens, full_logits, kind):
    """Prefill 3, extend by a chunk of 3 on a non-empty cache (the prefill's program: traced position), then
    one token at a time."""
    cache = model.init_cache(3, 16, kind)
    outs = []
    for a, b in [(0, 3), (3, 6)] + [(p, p + 1) for p in range(6, 9)]:
        lg, cache = _step(model, tokens[:, a:b], cache, jnp.int32(a))
        outs.append(np.asarray(lg))
    chex.assert_trees_all_close(np.concatenate(outs, 1), full_logits, rtol=0, atol=1e-5)


def test_prefill_sized_call_attends_like_training(model):
    """A cached call of at least 17 queries (tiny's head shapes: dsv3.flops.expand_latent_keys) attends on
    keys expanded from the latent cache; then decode steps attend absorbed. Both give the full forward's
    logits."""
    from dsv3.flops import expand_latent_keys

    assert expand_latent_keys(CFG, 17) and not expand_latent_keys(CFG, 16)
    x = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 20)), jnp.int32)
    cache = model.init_cache(2, 24)
    first, cache = _step(model, x[:, :18], cache, jnp.int32(0))
    outs = [np.asarray(first)]
    for p in (18, 19):
        lg, cache = _step(model, x[:, p:p + 1], cache, jnp.int32(p))
        outs.append(np.asarray(lg))
    chex.assert_trees_all_close(np.concatenate(outs, 1), np.asarray(model(x)), rtol=0, atol=1e-5)


def test_long_calls_attend_in_causal_query_blocks(model, monkeypatch):
    """With 4-query blocks (dsv3.flops.CAUSAL_QUERY_BLOCK = 4), a 20-token training forward and a 20-token
    prefill at entry 0 (a Python int) attend in 5 query blocks, block j on the keys up to its last position
    (4 (j + 1)); both give the one-block logits. A traced start position stays one block (on the whole
    cache)."""
    import dsv3.flops
    import dsv3_jax.mla as mla

    x = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 20)), jnp.int32)
    one_block = np.asarray(model(x))  # the program of test_prefill_sized_call_attends_like_training
    keys = []  # fresh nnx.jit functions below: traced with the patched block
    block = mla.MLA._attend_block
    monkeypatch.setattr(dsv3.flops, "CAUSAL_QUERY_BLOCK", 4)
    monkeypatch.setattr(mla.MLA, "_attend_block", lambda self, q, k, v, m: (keys.append(k.shape[1]),
                                                                             block(self, q, k, v, m))[1])
    blocked = np.asarray(nnx.jit(lambda m, t: m.logits(t))(model, x))
    assert keys == [4, 8, 12, 16, 20] * CFG.num_hidden_layers
    keys.clear()
    prefill, _ = nnx.jit(lambda m, t, c: m.forward_cached(t, c, 0))(model, x, model.init_cache(2, 24))
    assert keys == [4, 8, 12, 16, 20] * CFG.num_hidden_layers
    keys.clear()
    traced, _ = nnx.jit(lambda m, t, c, p: m.forward_cached(t, c, p))(model, x, model.init_cache(2, 24), jnp.int32(0))
    assert keys == [24] * CFG.num_hidden_layers
    for out in (blocked, prefill, traced):
        chex.assert_trees_all_close(np.asarray(out), one_block, rtol=0, atol=1e-5)


def test_decode_step_compiles_once(model, tokens):
    f = nnx.jit(lambda m, t, c, p: m.forward_cached(t, c, p))
    cache = model.init_cache(3, 16, "latent")
    traces = []
    g = nnx.jit(lambda m, t, c, p: (traces.append(1), m.forward_cached(t, c, p))[1])
    for p in range(5):
        _, cache = g(model, tokens[:, p:p + 1], cache, jnp.int32(p))
    assert len(traces) == 1


def test_latent_cache_holds_c_kv_and_k_pe(model):
    c = model.init_cache(3, 7, "latent")
    assert len(c.layers) == CFG.num_hidden_layers and (c.kind, c.max_len, c.batch) == ("latent", 7, 3)
    c = c.layers
    assert c[0]["c_kv"].shape == (3, 7, CFG.kv_lora_rank) and c[0]["k_pe"].shape == (3, 7, CFG.qk_rope_head_dim)
    n = model.init_cache(3, 7, "naive").layers[0]
    assert n["k"].shape == (3, 7, CFG.num_attention_heads, CFG.qk_head_dim)
    assert n["v"].shape == (3, 7, CFG.num_attention_heads, CFG.v_head_dim)


# As in the torch test: changing later tokens changes where every other token's row
# lands in the grouped expert matmul, and XLA:CPU's dot rounds by row position (measured
# 9e-8 with the dot emitter dsv3.runtime selects). A leak moves logits by ~1e-2 or more.
ULP_NOISE = 1e-6


def test_causality(model, tokens, full_logits):
    t2 = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % CFG.vocab_size)
    out = np.asarray(model(t2))
    assert np.abs(out[:, :6] - full_logits[:, :6]).max() <= ULP_NOISE
    assert np.abs(out[:, 6:] - full_logits[:, 6:]).max() > 1e-3


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="vocab|\\[0, 256\\)"):
        model(jnp.asarray([[1, 256]]))
    with pytest.raises(ValueError, match="\\[0, 256\\)"):
        model(np.asarray([[-1, 3]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, CFG.max_position_embeddings + 1), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="kind"):
        model.init_cache(1, 4, "paged")
    with pytest.raises(ValueError, match="cache"):
        model.forward_cached(jnp.zeros((1, 5), jnp.int32), model.init_cache(1, 4), 0)
    with pytest.raises(ValueError, match="counts"):
        model.update_router_bias(jnp.zeros((1, CFG.n_routed_experts)))


def test_load_canonical_state_names_bad_entries(model):
    state = model.canonical_state()
    bad = dict(state)
    del bad["layers.0.attn.wo.weight"]
    bad["layers.0.attn.extra"] = np.zeros(3, np.float32)
    bad["norm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointError) as e:
        DeepSeekV3(CFG).load_canonical_state(bad)
    msg = str(e.value)
    assert "layers.0.attn.wo.weight" in msg and "layers.0.attn.extra" in msg and "norm.weight" in msg


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_bit_exact(model, tmp_path, dtype):
    m = model
    if dtype != jnp.float32:
        m = DeepSeekV3(CFG, dtype=dtype)
        m.load_canonical_state(model.canonical_state())
    state = m.canonical_state()
    assert set(state) == set(canonical_shapes(CFG))
    assert all(state[k].shape == s for k, s in canonical_shapes(CFG).items())
    m.save_pretrained(tmp_path)
    back = DeepSeekV3.from_pretrained(tmp_path, dtype=dtype).canonical_state()
    assert set(back) == set(state)
    chex.assert_trees_all_equal_dtypes(back, state)
    chex.assert_trees_all_equal({k: v.view(np.uint8) for k, v in back.items()},
                                {k: v.view(np.uint8) for k, v in state.items()})  # bit-exact
    if dtype == jnp.bfloat16:  # router stays fp32 in a bf16 model
        assert state["layers.1.ffn.gate.weight"].dtype == np.float32


def test_v3_671b_abstract_param_count():
    cfg = ModelConfig.preset("v3-671b")
    m = DeepSeekV3.abstract(cfg)
    assert isinstance(m.layers[60].ffn.experts.w1.get_value(), jax.ShapeDtypeStruct)
    assert m.layers[60].ffn.experts.w1.get_value().shape == (256, 7168, 2048)
    want = sum(int(np.prod(s)) for s in canonical_shapes(cfg).values())
    assert want == 682_636_487_424  # 671B main + MTP, router biases included
    assert m.num_params() == want - sum(cfg.n_routed_experts for _ in range(cfg.n_router_layers))


def test_loss_terms_and_mtp_alignment(model, tokens):
    labels = jnp.roll(tokens, -1, axis=1).at[:, -1].set(-100)
    out = _loss(model, tokens, labels)
    # manual: main CE, depth-1 CE on roll(labels, -1) with the last position masked
    lg = np.asarray(model(tokens), np.float64)

    def ce(logits, lab):
        lp = logits - logits.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        v = lab != -100
        return -(np.take_along_axis(lp, np.where(v, lab, 0)[..., None], -1)[..., 0] * v).sum() / v.sum()

    chex.assert_trees_all_close(float(out.main_loss), ce(lg, np.asarray(labels)), rtol=1e-5)
    chex.assert_shape(out.mtp_losses, (1,))
    chex.assert_trees_all_close(out.mtp_loss, CFG.mtp_loss_weight * out.mtp_losses[0], rtol=1e-6)
    chex.assert_trees_all_close(out.loss, out.main_loss + out.mtp_loss + out.balance_loss, rtol=1e-6)
    chex.assert_shape(out.counts, (CFG.n_router_layers, CFG.n_routed_experts))
    chex.assert_trees_all_equal(np.asarray(out.counts).sum(1),
                                np.full(CFG.n_router_layers, tokens.size * CFG.num_experts_per_tok))
    assert 0 < float(out.balance_loss) < 10 * CFG.balance_loss_alpha * CFG.n_router_layers


def test_mtp_uses_embedding_of_next_token(model, tokens):
    """Depth-1 logits at position i depend on t_{i+1} (its embedding input) and never on t_{i+2}."""
    labels = jnp.roll(tokens, -1, axis=1)
    f = lambda m, a, b: _loss(m, a, b).mtp_losses[0]  # the program of test_loss_terms_and_mtp_alignment
    base = float(f(model, tokens, labels))
    lab_mask = labels.at[:, :].set(-100).at[:, 4].set(labels[:, 4])  # only position 3 scored at depth 1
    t_next = tokens.at[:, 4].set((tokens[:, 4] + 7) % CFG.vocab_size)
    t_far = tokens.at[:, 6].set((tokens[:, 6] + 7) % CFG.vocab_size)
    a = float(f(model, tokens, lab_mask))
    assert float(f(model, t_next, lab_mask)) != a  # embed(t_{i+1}) enters position 3
    assert float(f(model, t_far, lab_mask)) == a   # t_{i+3} is in the future
    assert base != a


def test_forward_never_changes_bias_and_update_in_jit(model, tokens):
    before = [np.asarray(r.bias[...]).copy() for r in model.routers()]
    labels = jnp.roll(tokens, -1, axis=1)

    @nnx.jit
    def step(m, t, l):
        out = m.compute_loss(t, l)
        m.update_router_bias(out.counts, gamma=0.01)
        return out.counts

    counts = np.asarray(step(model, tokens, labels)).astype(np.float64)
    for r, b0, c in zip(model.routers(), before, counts):
        chex.assert_trees_all_close(np.asarray(r.bias[...]), b0 + 0.01 * np.sign(c.mean() - c), rtol=0, atol=1e-7)
        assert isinstance(r.bias, RouterBias)
    model.update_router_bias(-jnp.asarray(counts), gamma=0.01)  # exact inverse: restore the fixture
    for r, b0 in zip(model.routers(), before):
        chex.assert_trees_all_close(np.asarray(r.bias[...]), b0, rtol=0, atol=1e-7)


def test_generate_ragged_prompts_greedy_equals_full_forward(model):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    streamed = []
    out = generate(model, prompts, 4, on_token=lambda b, t: streamed.append((b, t)))
    L = max(map(len, prompts)) + 4
    for p, new in zip(prompts, out):
        seq = list(p)
        for _ in range(4):  # causal: zero padding after the sequence does not change its logits
            lg = model(jnp.asarray([seq + [0] * (L - len(seq))], jnp.int32))
            seq.append(int(np.argmax(np.asarray(lg)[0, len(seq) - 1])))
        assert new == seq[len(p):]
    assert sorted(streamed) == sorted((b, t) for b, new in enumerate(out) for t in new)
    naive = generate(model, prompts, 4, cache="naive")
    assert naive == out
    eos = out[0][1]
    cut = generate(model, prompts, 4, eos=eos)
    assert cut[0] == out[0][: out[0].index(eos) + 1]


def test_generate_sampling_is_seeded(model):
    a = generate(model, [[1, 2, 3]], 5, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert a == generate(model, [[1, 2, 3]], 5, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert all(0 <= t < CFG.vocab_size for t in a[0]) and len(a[0]) == 5



@pytest.mark.parametrize("width", [256, 8448, 100, 48, 7])
def test_softmax_and_log_softmax_are_jax_nns_bit_for_bit(width):
    """dsv3_jax.layers.softmax / log_softmax (a row max by halves) equal jax.nn's, values and gradients,
    bit for bit, jitted: on widths halved to 32 and below it, odd ones, masked (-inf) entries, a fully
    masked row (NaN either way) and a NaN entry."""
    from dsv3_jax.layers import log_softmax, row_max, softmax

    x = 4 * jax.random.normal(jax.random.key(width), (3, 5, width), jnp.float32)
    x = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.3, x.shape), -jnp.inf, x).at[:, :, 0].set(1.0)
    x = x.at[0, 0].set(-jnp.inf).at[1, 2, width // 2].set(jnp.nan)
    g = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    np.testing.assert_array_equal(jax.jit(row_max)(x), jnp.max(x, axis=-1, keepdims=True))
    for ours, ref in ((softmax, lambda v: jax.nn.softmax(v, axis=-1)),
                      (log_softmax, lambda v: jax.nn.log_softmax(v, axis=-1))):
        (y, dx), (y_ref, dx_ref) = (jax.jit(lambda v, f=f: (f(v), jax.vjp(f, v)[1](g)[0]))(x) for f in (ours, ref))
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        assert np.isnan(np.asarray(y)[0, 0]).all() and np.isnan(np.asarray(y)[1, 2]).all()
        assert np.isfinite(np.asarray(y)[2]).any()
