"""dsv3_jax MoE: expert loop == block-sparse == ragged_dot == per-token dense reference; routing rules; bias
handling.

Trees and arrays are compared with chex (``assert_trees_all_close`` / ``assert_trees_all_equal``), shapes
with ``chex.assert_shape``; the MoE layer and the router are checked with and without jit (``chex.variants``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax.moe
from dsv3.config import ModelConfig
from dsv3_jax.moe import (MoE, Router, RouterBias, _blocksparse_swiglu, _loop_swiglu, _ragged_swiglu,
                          default_block_rows, default_chunk_rows, sort_by_expert, stable_argsort)

CFG = ModelConfig.preset("tiny").replace(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)


def per_token_reference(x, idx, w1, w2, w3):
    """Each (token, slot) through its own expert, densely: x [N, D], idx [N, K] -> [N, K, D]."""
    W1, W2, W3 = w1[idx], w2[idx], w3[idx]  # [N, K, D, F], [N, K, F, D]
    h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", x, W1)) * jnp.einsum("nd,nkdf->nkf", x, W3)
    return jnp.einsum("nkf,nkfd->nkd", h, W2)


def through_dispatch(experts, x, idx, impl):
    """Per-(token, slot) expert outputs [N, K, D] through the real dispatch: sort by expert, compute, un-sort."""
    N, K = idx.shape
    d = sort_by_expert(idx, experts.w1.shape[0], x.dtype)
    return experts(x[d.tokens], d.counts, impl=impl)[d.inverse].reshape(N, K, -1)


@pytest.fixture(scope="module")
def moe():
    m = MoE(CFG, rngs=nnx.Rngs(3))
    m.gate.bias[...] = jnp.asarray(np.random.default_rng(0).normal(0, 0.05, CFG.n_routed_experts), jnp.float32)
    return m


def _weights(m):
    return m.experts.w1[...], m.experts.w2[...], m.experts.w3[...]


@pytest.mark.parametrize("skew", [False, True])
def test_expert_paths_agree_with_per_token_reference(moe, skew):
    rng = np.random.default_rng(1)
    N, K, E = 37, CFG.num_experts_per_tok, CFG.n_routed_experts
    x = jnp.asarray(rng.standard_normal((N, CFG.hidden_size)), jnp.float32)
    if skew:  # every token on experts 0..K-1: one group far larger than a block
        idx = jnp.tile(jnp.arange(K, dtype=jnp.int32), (N, 1))
    else:
        idx = jnp.asarray(np.sort(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]), -1), jnp.int32)
    ref = jax.jit(per_token_reference)(x, idx, *_weights(moe))
    for impl in ("loop", "blocksparse", "ragged"):
        out = nnx.jit(lambda e, x, idx: through_dispatch(e, x, idx, impl))(moe.experts, x, idx)
        chex.assert_shape(out, (N, K, CFG.hidden_size))
        chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5, custom_message=impl)


@pytest.mark.parametrize("chunk_blocks", [None, 3])
@pytest.mark.parametrize("bm", [1, 16])
def test_blocksparse_any_block_size_and_gradient(moe, bm, chunk_blocks, monkeypatch):
    """Every block size gives the ragged_dot result, forward and gradient (static bound never overflows),
    all blocks in one chunk or in chunks of 3 (37 and 10 blocks: a last chunk padded)."""
    if chunk_blocks:
        one_block = CFG.hidden_size * CFG.moe_intermediate_size * 4
        monkeypatch.setattr(dsv3_jax.moe, "BLOCK_GATHER_BYTES", 0)
        monkeypatch.setattr(dsv3_jax.moe, "BLOCK_CHUNK_BYTES", chunk_blocks * one_block)
    rng = np.random.default_rng(2)
    M, D, E = 29, CFG.hidden_size, CFG.n_routed_experts
    sizes = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)
    xs = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    w = _weights(moe)
    f_bs = lambda xs, *w: (lambda yb, pos: yb[pos])(*_blocksparse_swiglu(xs, sizes, *w, bm))
    f_rg = lambda xs, *w: _ragged_swiglu(xs, sizes, *w)
    chex.assert_trees_all_close(jax.jit(f_bs)(xs, *w), f_rg(xs, *w), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    g_bs = jax.jit(jax.grad(loss(f_bs), argnums=(0, 1, 2, 3)))(xs, *w)
    g_rg = jax.jit(jax.grad(loss(f_rg), argnums=(0, 1, 2, 3)))(xs, *w)
    chex.assert_trees_all_equal_shapes(g_bs, (xs, *w))
    chex.assert_trees_all_close(g_bs, g_rg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("c", [1, 4, 64])
def test_expert_loop_any_chunk_size_and_gradient(moe, c, dtype):
    """Every chunk size gives the ragged_dot result, forward and gradient: chunks of 1 row, of 4 (experts
    of 0 to 9 rows: empty experts, partial last chunks whose tails reach the next experts' rows and the
    padding), and one chunk longer than all 29 rows. bf16 within bf16 rounding of ragged_dot's."""
    rng = np.random.default_rng(2)
    M, D, E = 29, CFG.hidden_size, CFG.n_routed_experts
    sizes = jnp.asarray([0, 9, 3, 0, 5, 1, 7, 4], jnp.int32)  # two empty experts
    assert sizes.shape == (E,) and int(sizes.sum()) == M
    xs = jnp.asarray(rng.standard_normal((M, D)), dtype)
    w = tuple(a.astype(dtype) for a in _weights(moe))
    f_lp = lambda xs, *w: _loop_swiglu(xs, sizes, *w, c)
    f_rg = lambda xs, *w: _ragged_swiglu(xs, sizes, *w)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    chex.assert_trees_all_close(jax.jit(f_lp)(xs, *w), f_rg(xs, *w), **tol)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))
    g_lp = jax.jit(jax.grad(loss(f_lp), argnums=(0, 1, 2, 3)))(xs, *w)
    g_rg = jax.jit(jax.grad(loss(f_rg), argnums=(0, 1, 2, 3)))(xs, *w)
    chex.assert_trees_all_equal_shapes_and_dtypes(g_lp, (xs, *w))
    chex.assert_trees_all_close(g_lp, g_rg, **tol)


def test_expert_loop_rows_past_the_groups_get_no_gradient(moe):
    """Under expert parallelism a shard's rows past sum(sizes) belong to other shards' experts: the loop
    computes the groups' rows as ragged_dot does and gives the other rows no gradient."""
    rng = np.random.default_rng(6)
    M, D, E = 29, CFG.hidden_size, CFG.n_routed_experts
    sizes = jnp.asarray(np.bincount(rng.integers(0, E, 21), minlength=E), jnp.int32)  # 21 of 29 rows
    xs = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    w = _weights(moe)
    f_lp = lambda xs, *w: _loop_swiglu(xs, sizes, *w, 4)[:21]
    f_rg = lambda xs, *w: _ragged_swiglu(xs, sizes, *w)[:21]
    chex.assert_trees_all_close(jax.jit(f_lp)(xs, *w), f_rg(xs, *w), rtol=1e-5, atol=1e-6)
    g_lp = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f_lp(*a))), argnums=(0, 1, 2, 3)))(xs, *w)
    g_rg = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f_rg(*a))), argnums=(0, 1, 2, 3)))(xs, *w)
    chex.assert_trees_all_close(g_lp, g_rg, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(g_lp[0][21:]))


def test_gspmd_partitioned_local_dispatch_runs_block_sparse(moe, monkeypatch):
    """On a mesh without an expert axis (LocalDispatcher.gspmd, set by use_expert_parallel) "auto" runs
    block-sparse, whose blocks GSPMD splits over the devices, instead of the loop; on one device, the loop."""
    from dsv3_jax.moe import LocalDispatcher

    calls = []
    monkeypatch.setattr(dsv3_jax.moe, "_loop_swiglu", lambda *a: calls.append("loop") or _ragged_swiglu(*a[:5]))
    monkeypatch.setattr(dsv3_jax.moe, "_blocksparse_swiglu",
                        lambda *a: calls.append("blocksparse") or _blocksparse_swiglu(*a))
    rng = np.random.default_rng(7)
    E, K = CFG.n_routed_experts, CFG.num_experts_per_tok
    sizes = jnp.asarray(np.bincount(rng.integers(0, E, 12), minlength=E), jnp.int32)
    xs = jnp.asarray(rng.standard_normal((12, CFG.hidden_size)), jnp.float32)
    assert moe.experts.impl == "auto" and moe.experts.resolved_impl() == "loop"
    ref = _ragged_swiglu(xs, sizes, *_weights(moe))
    for gspmd in (True, False):
        out = LocalDispatcher(E, K, gspmd=gspmd).compute(moe.experts, xs, sizes)
        chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)
    assert calls == ["blocksparse", "loop"]


@pytest.mark.parametrize("bound", [1, 5, 16, 2**28])  # 2**28: keys * M would overflow int32, argsort's path
def test_stable_argsort_is_argsort(bound):
    keys = jnp.asarray(np.random.default_rng(bound).integers(0, min(bound, 1000), 97), jnp.int32)
    got = stable_argsort(keys, bound)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argsort(np.asarray(keys), kind="stable"))


def test_default_chunk_rows():
    assert default_chunk_rows(8192, 16) == 256  # peer-small: 2048 tokens x top-4 over 16 experts
    assert default_chunk_rows(12288, 64) == 64  # medium: 2048 tokens x top-6 over 64 experts
    assert default_chunk_rows(32, 16) == 8  # a decoding step of 8 tokens, peer-small
    assert default_chunk_rows(2048, 16) == 64 and default_chunk_rows(65536, 64) == 256


def test_default_block_rows_bounds_padding():
    assert default_block_rows(8, 256) == 8
    for M, E in [(8192, 16), (65536, 256), (100, 8), (12288, 64)]:
        bm = default_block_rows(M, E)
        assert 8 <= bm <= 256 and (bm == 8 or E * bm <= M / 4 or (bm == 64 and E * bm <= M / 2))
    assert default_block_rows(12288, 64) == 64  # the medium preset's 2048 tokens x top-6 (M/4 alone: 32)


def test_moe_forward_matches_reference_and_counts(moe):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, CFG.hidden_size)), jnp.float32)
    @nnx.jit
    def run(moe, x):
        xf = x.reshape(-1, CFG.hidden_size)
        _, idx, w = moe.gate(xf)
        routed = jnp.einsum("nkd,nk->nd", per_token_reference(xf, idx, *_weights(moe)), w)
        return moe(x), routed + moe.shared_experts(xf), idx

    out, ref, idx = run(moe, x)
    chex.assert_shape(out.out, x.shape)
    chex.assert_trees_all_close(out.out.reshape(-1, CFG.hidden_size), ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(np.asarray(out.counts),
                                np.bincount(np.asarray(idx).ravel(), minlength=CFG.n_routed_experts))
    assert int(out.counts.sum()) == 18 * CFG.num_experts_per_tok


def test_router_rules_numpy():
    """Group limit, -inf masking, bias selects but does not weigh, sorted slots, normalised x scaling."""
    r = Router(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    r.bias[...] = jnp.asarray(rng.normal(0, 0.3, CFG.n_routed_experts) - 1.0, jnp.float32)  # negative biases
    x = rng.standard_normal((50, CFG.hidden_size)).astype(np.float32)
    s, idx, w = nnx.jit(lambda r, x: r(x))(r, jnp.asarray(x))
    W, b = np.asarray(r.weight[...]), np.asarray(r.bias[...])
    E, G, K = CFG.n_routed_experts, CFG.n_group, CFG.num_experts_per_tok
    sc = 1 / (1 + np.exp(-(x.astype(np.float64) @ W.T.astype(np.float64))))
    for n in range(50):
        sel = sc[n] + b
        g = np.sort(sel.reshape(G, -1), -1)[:, -2:].sum(-1)
        keep = np.argsort(-g)[: CFG.topk_group]
        masked = np.where(np.repeat(np.isin(np.arange(G), keep), E // G), sel, -np.inf)
        want = np.sort(np.argsort(-masked)[:K])
        np.testing.assert_array_equal(np.asarray(idx[n]), want)
        ww = sc[n, want] / sc[n, want].sum() * CFG.routed_scaling_factor
        np.testing.assert_allclose(np.asarray(w[n]), ww, rtol=1e-5)


def test_router_bias_is_not_a_param(moe):
    assert isinstance(moe.gate.bias, RouterBias) and not isinstance(moe.gate.bias, nnx.Param)
    params = nnx.state(moe, nnx.Param)
    assert all("bias" not in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(params))
    x = jnp.ones((1, 4, CFG.hidden_size))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x).out)))(moe)
    assert all("bias" not in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads))


def test_experts_gradients_loop_and_blocksparse_equal_ragged(moe):
    """Through the real dispatch (sort, block layout, un-sort): d/dx and d/dw agree between paths."""
    rng = np.random.default_rng(5)
    N, K, E = 23, CFG.num_experts_per_tok, CFG.n_routed_experts
    x = jnp.asarray(rng.standard_normal((N, CFG.hidden_size)), jnp.float32)
    idx = jnp.asarray(np.sort(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]), -1), jnp.int32)
    grads = {}
    for impl in ("loop", "blocksparse", "ragged"):
        f = lambda e, x, impl=impl: jnp.sum(jnp.sin(through_dispatch(e, x, idx, impl)))
        grads[impl] = nnx.jit(nnx.grad(f, argnums=(0, 1)))(moe.experts, x)
    gw_r, gx_r = grads["ragged"]
    for impl in ("loop", "blocksparse"):
        gw, gx = grads[impl]
        chex.assert_trees_all_close(gx, gx_r, rtol=1e-5, atol=1e-6, custom_message=impl)
        chex.assert_trees_all_close({n: gw[n][...] for n in ("w1", "w2", "w3")},
                                    {n: gw_r[n][...] for n in ("w1", "w2", "w3")}, rtol=1e-5, atol=1e-6,
                                    custom_message=impl)


class MoEWithAndWithoutJit(chex.TestCase):
    """The same MoE layer and router results traced under jit and run op by op (chex.variants)."""

    def setUp(self):
        super().setUp()
        self.moe = MoE(CFG, rngs=nnx.Rngs(3))
        rng = np.random.default_rng(6)
        self.moe.gate.bias[...] = jnp.asarray(rng.normal(0, 0.05, CFG.n_routed_experts), jnp.float32)
        self.x = jnp.asarray(rng.standard_normal((2, 7, CFG.hidden_size)), jnp.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_moe_layer(self):
        moe, x = self.moe, self.x
        out = self.variant(lambda x: moe(x))(x)
        chex.assert_shape(out.out, x.shape)
        chex.assert_shape(out.counts, (CFG.n_routed_experts,))
        xf = x.reshape(-1, CFG.hidden_size)
        _, idx, w = moe.gate(xf)
        ref = jnp.einsum("nkd,nk->nd", per_token_reference(xf, idx, *_weights(moe)), w) + moe.shared_experts(xf)
        chex.assert_trees_all_close(out.out.reshape(-1, CFG.hidden_size), ref, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_equal(out.counts, jnp.bincount(idx.ravel(), length=CFG.n_routed_experts))

    @chex.variants(with_jit=True, without_jit=True)
    def test_router(self):
        gate, xf = self.moe.gate, self.x.reshape(-1, CFG.hidden_size)
        s, idx, w = self.variant(lambda x: gate(x))(xf)
        N, E, K = xf.shape[0], CFG.n_routed_experts, CFG.num_experts_per_tok
        chex.assert_shape((s, idx, w), ((N, E), (N, K), (N, K)))
        chex.assert_type((s, idx, w), (jnp.float32, jnp.int32, jnp.float32))
        chex.assert_trees_all_equal(idx, jnp.sort(idx, axis=-1))  # ascending slots
        sel = jnp.take_along_axis(s, idx, axis=-1)
        chex.assert_trees_all_close(w, sel / sel.sum(-1, keepdims=True) * CFG.routed_scaling_factor, rtol=1e-6)
