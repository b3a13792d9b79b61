"""Scanned layers (DeepSeekV3(scan_layers=True)) against the unrolled model loaded from the same canonical
state: forward, loss terms, counts, gradients, canonical round trip, bias update, cached generation, remat.

The 2-layer tiny model (one dense and one MoE layer, the MTP block's MoE) and the [3, 9] batch of test_model.py."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3.config import ModelConfig
from dsv3_jax import DeepSeekV3, generate
from dsv3_jax.model import UNROLLED_REMAT_ON_CPU

CFG = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
pytestmark = pytest.mark.xdist_group("jax_tiny_2layer")
GRAD_ATOL = 1e-6  # fp32: XLA may fuse a scanned layer differently from an unrolled one


@pytest.fixture(scope="module")
def unrolled():
    m = DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for r in m.routers():  # non-zero bias, as after training
        r.bias[...] = jnp.asarray(rng.normal(0, 0.05, CFG.n_routed_experts), jnp.float32)
    return m


def scanned_from(model, remat="none") -> DeepSeekV3:
    m = DeepSeekV3(CFG, rngs=nnx.Rngs(1), scan_layers=True, remat=remat)
    m.load_canonical_state(model.canonical_state())
    return m


@pytest.fixture(scope="module")
def scanned(unrolled):
    return scanned_from(unrolled)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 9)), jnp.int32)


def _loss_and_grads(model, tokens):
    """(LossOutput, {canonical name: gradient in torch layout}) of compute_loss(tokens, roll(tokens))."""
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    labels = jnp.roll(tokens, -1, axis=1)

    def f(p):
        out = nnx.merge(gd, p, rest).compute_loss(tokens, labels)
        return out.loss, out

    (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    gm = nnx.merge(gd, g, rest)  # the gradients in the model's own layout, read out canonically
    return out, gm.canonical_state()


@pytest.fixture(scope="module")
def reference(unrolled, tokens):
    return _loss_and_grads(unrolled, tokens)


def test_structure_and_canonical_round_trip_bit_exact(unrolled, scanned, tmp_path):
    assert scanned.layers is None
    assert scanned.dense_stack.attn.wo.kernel.get_value().shape[0] == CFG.first_k_dense_replace
    assert scanned.moe_stack.ffn.gate.bias[...].shape == (CFG.num_hidden_layers - CFG.first_k_dense_replace,
                                                          CFG.n_routed_experts)
    ref, got = unrolled.canonical_state(), scanned.canonical_state()
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    assert scanned.num_params() == unrolled.num_params()
    scanned.save_pretrained(tmp_path)
    back = DeepSeekV3.from_pretrained(tmp_path, scan_layers=True)
    assert back.scan_layers and all(np.array_equal(v, ref[k]) for k, v in back.canonical_state().items())
    abstract = DeepSeekV3.abstract(CFG, scan_layers=True)
    assert isinstance(abstract.moe_stack.ffn.experts.w1.get_value(), jax.ShapeDtypeStruct)


def test_logits_loss_counts_and_gradients(unrolled, scanned, tokens, reference):
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(unrolled(tokens)), rtol=0, atol=1e-5)
    ref_out, ref_g = reference
    out, g = _loss_and_grads(scanned, tokens)
    np.testing.assert_array_equal(np.asarray(out.counts), np.asarray(ref_out.counts))
    for f in ("loss", "main_loss", "mtp_loss", "balance_loss", "mtp_losses"):
        np.testing.assert_allclose(np.asarray(getattr(out, f)), np.asarray(getattr(ref_out, f)), rtol=1e-6, atol=1e-6,
                                   err_msg=f)
    assert set(g) == set(ref_g)
    for k in ref_g:
        np.testing.assert_allclose(g[k], ref_g[k], rtol=0, atol=GRAD_ATOL, err_msg=k)
    h, stats = scanned.hidden(tokens)
    assert len(stats) == CFG.n_router_layers - CFG.num_nextn_predict_layers
    np.testing.assert_array_equal(np.asarray(stats[0].counts), np.asarray(ref_out.counts[0]))


def test_scanned_remat_same_loss_and_gradients(unrolled, tokens, reference):
    ref_out, ref_g = reference
    out, g = _loss_and_grads(scanned_from(unrolled, "dots"), tokens)
    np.testing.assert_array_equal(np.asarray(out.counts), np.asarray(ref_out.counts))
    np.testing.assert_allclose(float(out.loss), float(ref_out.loss), rtol=1e-6, atol=1e-6)
    for k in ref_g:
        np.testing.assert_allclose(g[k], ref_g[k], rtol=0, atol=GRAD_ATOL, err_msg=k)


def test_unscanned_remat_same_gradients(unrolled, tokens, reference):
    """remat also applies to an unrolled model, one Block at a time ("full"; the scanned test takes "dots");
    on CPU the model warns that it saves no memory there."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = DeepSeekV3(CFG, rngs=nnx.Rngs(1), remat="full")
    on_cpu = jax.default_backend() == "cpu"
    assert [str(w.message) for w in caught if "remat" in str(w.message)] == ([UNROLLED_REMAT_ON_CPU] if on_cpu else [])
    m.load_canonical_state(unrolled.canonical_state())
    out, g = _loss_and_grads(m, tokens)
    np.testing.assert_allclose(float(out.loss), float(reference[0].loss), rtol=1e-6, atol=1e-6)
    for k in reference[1]:
        np.testing.assert_allclose(g[k], reference[1][k], rtol=0, atol=GRAD_ATOL, err_msg=k)


def test_bad_remat_refused():
    with pytest.raises(ValueError, match="remat must be one of"):
        DeepSeekV3(CFG, remat="some")


def test_update_router_bias_rows(unrolled, tokens):
    a, b = scanned_from(unrolled), scanned_from(unrolled)
    c = np.random.default_rng(2).integers(0, 20, (CFG.n_router_layers, CFG.n_routed_experts))
    b.update_router_bias(jnp.asarray(c), gamma=0.01)
    ref = DeepSeekV3(CFG, rngs=nnx.Rngs(1))
    ref.load_canonical_state(a.canonical_state())
    ref.update_router_bias(jnp.asarray(c), gamma=0.01)
    got, want = b.canonical_state(), ref.canonical_state()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="counts must be"):
        b.update_router_bias(jnp.zeros((CFG.n_router_layers + 1, CFG.n_routed_experts)))


def test_cached_generation_same_tokens(unrolled, scanned):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]  # ragged: the prefill's attention mask goes through the scan
    cache = scanned.init_cache(3, 16, "naive")
    assert cache.batch == 3 and cache.layers[0]["k"].shape[:2] == (CFG.first_k_dense_replace, 3)
    assert generate(scanned, prompts, 4) == generate(unrolled, prompts, 4)


def test_mesh_specs_of_layer_stacks_are_their_layers_specs():
    """On a mesh a stacked variable takes its layers' rule with the layer axis unsplit (the 8-device
    subprocess of tests/jax/test_sharding.py trains a scanned model on a mesh); abstract, nothing compiled."""
    from dsv3_jax.sharding import model_specs

    mesh = {"data": 2, "fsdp": 4, "expert": 2}
    unrolled = model_specs(DeepSeekV3.abstract(CFG), mesh)
    scanned = model_specs(DeepSeekV3.abstract(CFG, scan_layers=True), mesh)
    k = CFG.first_k_dense_replace
    for path, spec in scanned.items():
        if path[0] in ("dense_stack", "moe_stack"):
            layer = ("layers", 0 if path[0] == "dense_stack" else k, *path[1:])
            assert spec == jax.sharding.PartitionSpec(None, *unrolled[layer]), path
        else:
            assert spec == unrolled[path], path
    assert scanned[("moe_stack", "ffn", "experts", "w1")] == jax.sharding.PartitionSpec(None, "expert", None, "fsdp")
