"""DeepSeekMoE with auxiliary-loss-free balancing (Paper §2.1.2; REFERENCE §4, §8), Flax NNX port.

Three separable steps, so an expert-parallel dispatch can replace the single-device one:
  route     Router: fp32 sigmoid affinities s; selection on s + bias inside the top
            ``topk_group`` groups (a group scores the sum of its 2 best biased scores, the
            others are masked with -inf); top-K indices SORTED ascending (fixed slot order);
            weights from the UNBIASED s, normalised (+1e-20) and scaled.
  dispatch  (token, slot) pairs sorted by expert (dropless; no token is ever dropped).
  compute   Experts: SwiGLU per expert on its contiguous rows, by one of two grouped matmuls:
            "blocksparse": each expert's rows padded to whole blocks of ``bm`` rows, one batched
                matmul over at most ceil(N*K/bm) + E blocks, each block with its expert's weights
                gathered (fast on CPU: cost ~ routed FLOPs);
            "ragged": ``jax.lax.ragged_dot`` (grouped GEMM on GPU/TPU; on CPU it lowers to a
                masked all-experts matmul, ~20x the routed FLOPs, REFERENCE §11).
            "auto" picks blocksparse on CPU and ragged elsewhere.
  combine   "grouped" (default): out * w in fp32, summed over the K slots in slot order, one cast;
            "eager": (out * w) cast to the model dtype per slot and summed in the model dtype in
            ascending expert id (HF experts_implementation="eager", REFERENCE §4.5). Equal in fp32.

The router bias is a ``RouterBias`` variable (not an ``nnx.Param``): gradients, optimizers and
weight decay never touch it; only ``DeepSeekV3.update_router_bias`` changes it.

Shape legend: B batch, T time, N = B*T tokens, D model width, E routed experts, G groups,
K experts per token, M = N*K (token, slot) pairs, F expert width, bm rows per block, nb blocks.
Flax kernels: w1/w3 [E, D, F], w2 [E, F, D] (torch: [E, F, D], [E, D, F]).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3.config import ModelConfig
from dsv3_jax.mla import linear
from dsv3_jax.norm import const, normal_init

EXPERT_IMPLS = ("auto", "blocksparse", "ragged")


class RouterBias(nnx.Variable):
    """Aux-loss-free correction bias b [E] (fp32): selection only, never a gradient or optimizer target."""


def silu(x: jax.Array) -> jax.Array:
    """SiLU evaluated in fp32 and rounded once to x.dtype (torch's bf16 kernel does the same)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU FFN w2(silu(w1 x) * w3 x): the dense layers' FFN and the shared experts."""

    def __init__(self, dim: int, inter: int, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w1 = linear(dim, inter, cfg, dtype, rngs)
        self.w2 = linear(inter, dim, cfg, dtype, rngs)
        self.w3 = linear(dim, inter, cfg, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D], as 2-D matmuls on the rows
        x2 = x.reshape(-1, x.shape[-1])
        return self.w2(silu(self.w1(x2)) * self.w3(x2)).reshape(x.shape)


class Router(nnx.Module):
    """Group-limited top-K sigmoid router, all in fp32 (REFERENCE §4.1, §4.2). weight [E, D] (torch layout)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D = cfg.n_routed_experts, cfg.hidden_size
        self.weight = nnx.Param(normal_init(cfg.initializer_range)(rngs.params(), (E, D), jnp.float32))
        self.bias = RouterBias(const((E,), 0.0, jnp.float32))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, D] -> weights [N, K] fp32, indices [N, K] int32 (ascending), scores s [N, E] fp32."""
        cfg = self.cfg
        N = x.shape[0]
        E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        s = jax.nn.sigmoid(logits)  # affinities: give the WEIGHTS
        sel = s + self.bias[...]  # biased: SELECTION only
        if cfg.topk_group < G:
            gscore = jax.lax.top_k(sel.reshape(N, G, E // G), 2)[0].sum(-1)  # [N, G]
            _, gidx = jax.lax.top_k(gscore, cfg.topk_group)
            gmask = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], gidx].set(True)
            sel = jnp.where(jnp.repeat(gmask, E // G, axis=1), sel, -jnp.inf)
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(sel), K)
        idx = jnp.sort(idx, axis=-1).astype(jnp.int32)  # fixed slot order: ascending expert id
        w = jnp.take_along_axis(s, idx, axis=-1)
        if cfg.norm_topk_prob:
            w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
        return w * jnp.float32(cfg.routed_scaling_factor), idx, s


def default_block_rows(M: int, E: int) -> int:
    """Rows per block for the block-sparse path: a power of two in [8, 256] with E*bm <= M/4, so the
    static bound of M + E*bm computed rows stays within ~25% of the M routed rows (big blocks keep
    the per-block weight gather small next to the block's matmul)."""
    bm = 8
    while bm < 256 and E * bm * 2 * 4 <= M:
        bm *= 2
    return bm


def _block_layout(sizes: jax.Array, M: int, bm: int):
    """Static-shape block layout of M expert-sorted rows with group sizes [E].

    Each expert's rows start on a block boundary; nb = ceil(M/bm) + E blocks bound the padded total.
    Returns (bexp [nb] expert of each block, pos [M] padded row of each sorted row)."""
    E = sizes.shape[0]
    nb = -(-M // bm) + E
    padded = (sizes + bm - 1) // bm * bm                                   # [E]
    pend = jnp.cumsum(padded)
    shift = pend - padded - (jnp.cumsum(sizes) - sizes)                    # [E] padding before expert e
    bexp = jnp.minimum(jnp.searchsorted(pend, jnp.arange(nb) * bm, side="right"), E - 1)  # [nb]
    e_j = jnp.repeat(jnp.arange(E), sizes, total_repeat_length=M)          # sorted row -> expert
    return bexp, jnp.arange(M) + shift[e_j]


def _blocksparse_swiglu(xs, sizes, w1, w2, w3, bm: int, rows=None):
    """Grouped SwiGLU on expert-sorted rows -> (yb [nb*bm, D] padded rows, pos [M] padded row of
    each sorted row).

    xs [M, D] sorted rows, or (with ``rows`` [M]) any [N, D] array gathered through rows, so the
    dispatch gather and the block gather are one. Block g holds expert bexp[g]; its weights are
    gathered and all blocks run as one batched matmul.

    The padded-row -> source-row map is built by scatters, so XLA:CPU materialises it once:
    composed index arithmetic would be fused into the [nb*bm, D] gather and recomputed for every
    element (measured: the MoE layer forward 1.2-1.4x slower)."""
    M = xs.shape[0] if rows is None else rows.shape[0]
    D = xs.shape[1]
    bexp, pos = _block_layout(sizes, M, bm)
    P = bexp.shape[0] * bm
    src = jnp.zeros(P, jnp.int32).at[pos].set(jnp.arange(M, dtype=jnp.int32) if rows is None else rows)
    valid = jnp.zeros(P, bool).at[pos].set(True)                           # padding rows: zeros
    xb = jnp.where(valid[:, None], xs[src], 0).reshape(bexp.shape[0], bm, D)
    h = silu(jnp.einsum("gmd,gdf->gmf", xb, w1[bexp])) * jnp.einsum("gmd,gdf->gmf", xb, w3[bexp])
    yb = jnp.einsum("gmf,gfd->gmd", h, w2[bexp]).reshape(-1, D)
    return yb, pos


def _ragged_swiglu(xs, sizes, w1, w2, w3):
    """Grouped SwiGLU with jax.lax.ragged_dot (the reference grouped GEMM)."""
    h = silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
    return jax.lax.ragged_dot(h, w2, sizes)


class Experts(nnx.Module):
    """E routed SwiGLU experts stacked: w1, w3 [E, D, F], w2 [E, F, D] (Flax [in, out] per expert)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        self.impl = impl
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = normal_init(cfg.initializer_range)
        self.w1 = nnx.Param(init(rngs.params(), (E, D, F), dtype))
        self.w2 = nnx.Param(init(rngs.params(), (E, F, D), dtype))
        self.w3 = nnx.Param(init(rngs.params(), (E, D, F), dtype))

    def resolved_impl(self) -> str:
        if self.impl != "auto":
            return self.impl
        return "blocksparse" if jax.default_backend() == "cpu" else "ragged"

    def __call__(self, x: jax.Array, idx: jax.Array, impl: str | None = None) -> jax.Array:
        """x [N, D], idx [N, K] -> per-(token, slot) expert outputs [N, K, D] in the model dtype."""
        N, D = x.shape
        K = idx.shape[1]
        E = self.w1.shape[0]
        flat = idx.reshape(-1)                                     # [M] expert of pair (n, k)
        order = jnp.argsort(flat, stable=True)                     # dispatch: pairs sorted by expert
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)     # [E]
        w1, w2, w3 = self.w1[...], self.w2[...], self.w3[...]
        impl = impl or self.resolved_impl()
        if impl == "ragged":
            ys = _ragged_swiglu(x[order // K], sizes, w1, w2, w3)  # [M, D] expert-sorted rows
            inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
            return ys[inv].reshape(N, K, D)                        # back to (token, slot) order
        if impl == "blocksparse":  # one gather in (token -> padded block row), one out
            yb, pos = _blocksparse_swiglu(x, sizes, w1, w2, w3, default_block_rows(N * K, E),
                                          rows=(order // K).astype(jnp.int32))
            back = jnp.zeros_like(pos).at[order].set(pos)          # pair (n, k) -> its padded row
            return yb[back].reshape(N, K, D)
        raise ValueError(f"expert impl must be 'blocksparse' or 'ragged', got {impl!r}")


def combine(y: jax.Array, w: jax.Array, scheme: str = "grouped") -> jax.Array:
    """Weighted sum over slots: y [N, K, D] (model dtype), w [N, K] fp32 -> [N, D] model dtype.

    Slots are in ascending expert id, so a running sum over k reproduces HF's eager order.
    """
    dt, K = y.dtype, y.shape[1]
    if scheme == "grouped":
        acc = y[:, 0].astype(jnp.float32) * w[:, 0, None]
        for k in range(1, K):
            acc = acc + y[:, k].astype(jnp.float32) * w[:, k, None]
        return acc.astype(dt)
    if scheme == "eager":
        acc = jnp.zeros(y.shape[::2], dt)
        for k in range(K):
            acc = acc + (y[:, k].astype(jnp.float32) * w[:, k, None]).astype(dt)
        return acc
    raise ValueError(f"combine scheme must be 'grouped' or 'eager', got {scheme!r}")


def sequence_balance_loss(s: jax.Array, K: int) -> jax.Array:
    """Sequence-wise balance loss sum_i f_i P_i averaged over sequences (Paper eqs. 17-20; REFERENCE §8.2).

    s [B, T, E] unbiased fp32 scores. f_i counts the top-K of s (no bias, no group limit) and has no
    gradient; P_i, the mean normalised score, is the only gradient path. Multiply by alpha outside.
    """
    B, T, E = s.shape
    _, top = jax.lax.top_k(jax.lax.stop_gradient(s), K)                          # [B, T, K]
    hits = jnp.sum(jax.nn.one_hot(top, E, dtype=jnp.float32), axis=(1, 2))       # [B, E]
    f = jax.lax.stop_gradient(hits * (E / (K * T)))
    P = jnp.mean(s / jnp.sum(s, axis=-1, keepdims=True), axis=1)                # [B, E]
    return jnp.mean(jnp.sum(f * P, axis=-1))


class MoEOutput(NamedTuple):
    out: jax.Array     # [B, T, D] model dtype
    counts: jax.Array  # [E] int32 (token, slot) assignments
    scores: jax.Array  # [B, T, E] fp32 unbiased affinities (for the balance loss)


class MoE(nnx.Module):
    """Routed experts (dropless, grouped by expert) + shared experts -> MoEOutput. Never changes the bias."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, impl: str = "auto",
                 combine: str = "grouped", rngs: nnx.Rngs):
        if combine not in ("grouped", "eager"):
            raise ValueError(f"combine scheme must be 'grouped' or 'eager', got {combine!r}")
        self.cfg = cfg
        self.combine = combine
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, impl=impl, rngs=rngs)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size,
                                      cfg, dtype=dtype, rngs=rngs)
        else:
            self.shared_experts = None

    def __call__(self, x: jax.Array) -> MoEOutput:
        """x [B, T, D] -> MoEOutput(out [B, T, D], counts [E], scores [B, T, E])."""
        B, T, D = x.shape
        E = self.cfg.n_routed_experts
        xf = x.reshape(B * T, D)
        w, idx, s = self.gate(xf)
        y = combine(self.experts(xf, idx), w, self.combine)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        counts = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.int32)
        return MoEOutput(y.reshape(B, T, D), counts, s.reshape(B, T, E))
