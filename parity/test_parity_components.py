"""Component by component, forward: RMSNorm, RoPE/YaRN, MLA (train, absorbed, naive), router, MoE,
dense FFN, Block, MTP module — torch vs jax on the same weights, fp32 and bf16, both birth directions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dsv3_jax
from dsv3.config import ModelConfig
from dsv3_jax.rope import rope_inv_freq as jax_inv_freq
from dsv3_torch.rope import apply_rope as torch_apply_rope
from dsv3_torch.rope import rope_inv_freq as torch_inv_freq
from parity_util import TOL, assert_close, make_pair, np32, record

TINY = ModelConfig.preset("tiny")
PAIRS = [("float32", "torch"), ("float32", "jax"), ("bfloat16", "torch")]
# One jitted call for every component: the fp32 pairs of both birth directions (same structure, same
# shapes) then share each component's compiled program instead of tracing a fresh closure per test.
_call = nnx.jit(lambda m, *args: m(*args))


@pytest.fixture(scope="module", params=PAIRS, ids=["fp32-torch_born", "fp32-jax_born", "bf16-torch_born"])
def pair(request):
    dtype, born = request.param
    tm, jm = make_pair(TINY, dtype, born, seed=3)
    return dtype, tm, jm


def _x(shape, dtype, seed=0):
    """The same input in both frameworks (rounded once to the model dtype)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    t = torch.tensor(x).to(dsv3_torch_dtype(dtype))
    return t, jnp.asarray(np32(t), jnp.float32).astype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)


def dsv3_torch_dtype(dtype):
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def _rope(tm, jm, start, S, dtype):
    ct, st = tm.rope(torch.arange(start, start + S), dsv3_torch_dtype(dtype))
    cj, sj = jm.rope(jnp.arange(start, start + S), jm.dtype)
    return (ct, st), (cj, sj)


@pytest.mark.parametrize("cfg", [TINY, ModelConfig.preset("v3-671b"), ModelConfig.preset("small"),
                                 TINY.replace(beta_fast=4.0, beta_slow=2.0, rope_factor=16.0)],
                         ids=["tiny-yarn", "v3-yarn", "small-plain", "yarn-narrow-ramp"])
def test_rope_inverse_frequencies_bit_identical(cfg):
    a, b = jax_inv_freq(cfg), torch_inv_freq(cfg).numpy()
    record("rope.inv_freq (YaRN)", "float32", float(np.abs(a - b).max()), 0.0, "max|d| (bit-exact)")
    np.testing.assert_array_equal(a, b)


def test_rmsnorm(pair):
    dtype, tm, jm = pair
    xt, xj = _x((2, 7, TINY.hidden_size), dtype)
    with torch.no_grad():
        ref = tm.layers[0].attn_norm(xt)
    out = _call(jm.layers[0].attn_norm, xj)
    assert_close("RMSNorm", dtype, out, ref)


def test_rope_apply(pair):
    dtype, tm, jm = pair
    (ct, st), (cj, sj) = _rope(tm, jm, 5, 9, dtype)
    assert_close("RoPE cos/sin", dtype, cj, ct)
    assert_close("RoPE cos/sin", dtype, sj, st)
    xt, xj = _x((2, 9, TINY.num_attention_heads, TINY.qk_rope_head_dim), dtype, 1)
    ref = torch_apply_rope(xt, ct[:, None, :], st[:, None, :])
    out = dsv3_jax.apply_rope(xj, cj[:, None, :], sj[:, None, :])
    assert_close("RoPE apply", dtype, out, ref)


def test_mla_training_path(pair):
    dtype, tm, jm = pair
    xt, xj = _x((2, 9, TINY.hidden_size), dtype, 2)
    (ct, st), (cj, sj) = _rope(tm, jm, 0, 9, dtype)
    with torch.no_grad():
        ref = tm.layers[1].attn(xt, ct, st)
    out = _call(jm.layers[1].attn, xj, cj, sj)
    assert_close("MLA train (naive, causal)", dtype, out, ref)


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_mla_cached_decode(pair, kind):
    """Prefill 5 then 2 single steps on each framework's cache; absorbed (latent) and expanded (naive)."""
    dtype, tm, jm = pair
    xt, xj = _x((2, 7, TINY.hidden_size), dtype, 3)
    tcache = tm.init_cache(2, 8, kind).layers[1]
    jcache = jm.init_cache(2, 8, kind).layers[1]
    for a, b in [(0, 5), (5, 6), (6, 7)]:
        (ct, st), (cj, sj) = _rope(tm, jm, a, b - a, dtype)
        with torch.no_grad():
            ref, tcache = tm.layers[1].attn(xt[:, a:b], ct, st, a, tcache)
        out, jcache = _call(jm.layers[1].attn, xj[:, a:b], cj, sj, jnp.int32(a), jcache)
        assert_close(f"MLA decode ({'absorbed' if kind == 'latent' else 'naive'})", dtype, out, ref)
    for name in jcache:  # the caches themselves agree
        assert_close(f"MLA cache {kind}", dtype, jcache[name][:, :7], tcache[name][:, :7])


def _router_inputs(dtype, n=64, seed=4):
    return _x((n, TINY.hidden_size), dtype, seed)


def check_routing(idx_j, idx_t, scores_t, bias, cfg, tol=1e-6):
    """Compare selected experts FIRST. A differing token is acceptable only as a reported near-tie
    (its K-th / (K+1)-th biased score, or its kept / dropped group score, within tol)."""
    idx_j, idx_t = np.asarray(idx_j), idx_t.numpy()
    bad = np.nonzero((idx_j != idx_t).any(-1))[0]
    ties = []
    for n in bad:
        sel = scores_t[n].double().numpy() + bias.double().numpy()
        g = np.sort(sel.reshape(cfg.n_group, -1), -1)[:, -2:].sum(-1)
        gs = np.sort(g)[::-1]
        es = np.sort(sel)[::-1]
        margin = min(gs[cfg.topk_group - 1] - gs[cfg.topk_group] if cfg.topk_group < cfg.n_group else np.inf,
                     es[cfg.num_experts_per_tok - 1] - es[cfg.num_experts_per_tok])
        assert margin < tol, f"token {n}: routing differs ({idx_j[n]} vs {idx_t[n]}) without a near-tie (margin {margin:.2e})"
        ties.append(n)
    return ties


def test_router_indices_then_weights(pair):
    dtype, tm, jm = pair
    xt, xj = _router_inputs(dtype)
    rt, rj = tm.layers[1].ffn.gate, jm.layers[1].ffn.gate
    with torch.no_grad():
        r = rt(xt)
    s, idx, w = _call(rj, xj)
    ties = check_routing(idx, r.indices, r.scores, rt.bias, TINY)
    assert not ties, f"near-ties at tokens {ties}: choose another seed for this test"
    record("router indices (mismatches)", dtype, 0.0, 0.0, "count")
    assert_close("router scores (fp32)", dtype, s, r.scores, TOL["float32"])
    assert_close("router weights (fp32)", dtype, w, r.weights, TOL["float32"])


def test_moe(pair):
    dtype, tm, jm = pair
    xt, xj = _x((2, 16, TINY.hidden_size), dtype, 5)
    with torch.no_grad():
        ref = tm.layers[1].ffn(xt)
    for impl in ("blocksparse", "ragged"):
        out = _call(jm.layers[1].ffn, xj) if impl == "blocksparse" else None
        if out is None:
            jm.layers[1].ffn.experts.impl = "ragged"
            try:
                out = _call(jm.layers[1].ffn, xj)
            finally:
                jm.layers[1].ffn.experts.impl = "auto"
        np.testing.assert_array_equal(np.asarray(out.counts), ref.counts.numpy())
        assert_close(f"MoE out ({impl})", dtype, out.out, ref.out)
        assert_close("MoE scores", dtype, out.scores, ref.scores, TOL["float32"])
    record("MoE counts (exact)", dtype, 0.0, 0.0, "exact")


def test_dense_ffn(pair):
    dtype, tm, jm = pair
    xt, xj = _x((2, 6, TINY.hidden_size), dtype, 6)
    with torch.no_grad():
        ref = tm.layers[0].ffn(xt)
    assert_close("dense FFN (SwiGLU)", dtype, _call(jm.layers[0].ffn, xj), ref)


@pytest.mark.parametrize("layer", [0, 1], ids=["dense", "moe"])
def test_block(pair, layer):
    dtype, tm, jm = pair
    xt, xj = _x((2, 8, TINY.hidden_size), dtype, 7)
    (ct, st), (cj, sj) = _rope(tm, jm, 0, 8, dtype)
    with torch.no_grad():
        ref, _, _ = tm.layers[layer](xt, ct, st)
    out, _, _ = _call(jm.layers[layer], xj, cj, sj)
    assert_close(f"Block ({'dense' if layer == 0 else 'MoE'})", dtype, out, ref)


def test_mtp_module(pair):
    dtype, tm, jm = pair
    ht, hj = _x((2, 8, TINY.hidden_size), dtype, 8)
    et, ej = _x((2, 8, TINY.hidden_size), dtype, 9)
    (ct, st), (cj, sj) = _rope(tm, jm, 0, 8, dtype)
    with torch.no_grad():
        ref, rout = tm.mtp[0](ht, et, ct, st)
    out, jout = _call(jm.mtp[0], hj, ej, cj, sj)
    np.testing.assert_array_equal(np.asarray(jout.counts), rout.counts.numpy())
    assert_close("MTP module", dtype, out, ref)
