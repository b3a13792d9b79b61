"""DeepSeekMoE with auxiliary-loss-free balancing (Paper §2.1.2; docs/reference.md §4, §8), Flax NNX port.

Four named steps, MoE.route -> dispatch -> compute -> combine; dispatch and combine sit behind one
dispatcher object (``LocalDispatcher``, single device), so an expert-parallel dispatcher can
replace it without touching the router or the experts' maths:
  route     Router -> Routing: fp32 sigmoid affinities s; selection on s + bias inside the top
            ``topk_group`` groups (a group scores the sum of its 2 best biased scores, the
            others are masked with -inf); top-K indices SORTED ascending (fixed slot order);
            weights from the UNBIASED s, normalised (+1e-20) and scaled.
  dispatch  LocalDispatcher.dispatch: (token, slot) pairs sorted by expert (dropless; no token is
            ever dropped) -> (x_sorted [M, D], group_sizes [E] int32, plan).
  compute   Experts: SwiGLU per expert on its contiguous rows, by one of three grouped matmuls:
            "loop": a loop over the experts and, inside, over chunks of ``c`` of the expert's rows
                (trip counts from group_sizes, so only the routed rows plus each expert's last
                partial chunk are computed), each chunk three 2-D matmuls with the expert's own
                weights (no gather), with its own backward in the same loops (CPU);
            "blocksparse": each expert's rows padded to whole blocks of ``bm`` rows, one batched
                matmul over at most ceil(N*K/bm) + E blocks, each block with its expert's weights
                gathered (cost ~ routed FLOPs plus the static bound's padding);
            "ragged": ``jax.lax.ragged_dot`` (grouped GEMM on GPU/TPU; on CPU it lowers to a
                masked all-experts matmul, E/K times the routed FLOPs, docs/reference.md §11).
            "auto" picks loop on CPU and ragged elsewhere.
  combine   LocalDispatcher.combine, scheme "grouped" (default): out * w in fp32, summed over the K slots in slot order, one cast;
            "eager": (out * w) cast to the model dtype per slot and summed in the model dtype in
            ascending expert id (HF experts_implementation="eager", docs/reference.md §4.5). Equal in fp32.

The router bias is a ``RouterBias`` variable (not an ``nnx.Param``): gradients, optimizers and
weight decay never touch it; only ``DeepSeekV3.update_router_bias`` changes it.

Shape legend: B batch, T time, N = B*T tokens, D model width, E routed experts, G groups,
K experts per token, M = N*K (token, slot) pairs, F expert width, bm rows per block, nb blocks,
c rows per chunk of the expert loop.
Flax kernels: w1/w3 [E, D, F], w2 [E, F, D] (torch: [E, F, D], [E, D, F]).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3.config import ModelConfig
from dsv3.types import Routing
from dsv3_jax.layers import const, linear, normal_init

EXPERT_IMPLS = ("auto", "loop", "blocksparse", "ragged")
COMBINES = ("grouped", "eager")


class RouterBias(nnx.Variable):
    """Aux-loss-free correction bias b [E] (fp32): selection only, never a gradient or optimizer target."""


def silu(x: jax.Array) -> jax.Array:
    """SiLU evaluated in fp32 and rounded once to x.dtype (torch's bf16 kernel does the same)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU FFN w2(silu(w1 x) * w3 x): the dense layers' FFN and the shared experts."""

    def __init__(self, dim: int, inter: int, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        # cfg: the initializer range (torch initialises in DeepSeekV3.reset_parameters)
        self.w1 = linear(dim, inter, cfg, dtype, rngs)
        self.w2 = linear(inter, dim, cfg, dtype, rngs)
        self.w3 = linear(dim, inter, cfg, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D], as 2-D matmuls on the rows
        x2 = x.reshape(-1, x.shape[-1])
        return self.w2(silu(self.w1(x2)) * self.w3(x2)).reshape(x.shape)


class Router(nnx.Module):
    """Group-limited top-K sigmoid router, all in fp32 (docs/reference.md §4.1, §4.2). weight [E, D] (torch layout)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D = cfg.n_routed_experts, cfg.hidden_size
        self.weight = nnx.Param(normal_init(cfg.initializer_range)(rngs.params(), (E, D), jnp.float32))
        self.bias = RouterBias(const((E,), 0.0, jnp.float32))

    def select(self, scores: jax.Array) -> jax.Array:
        """[N, E] fp32 scores -> [N, K] int32 expert ids, ascending (bias + group limit)."""
        cfg = self.cfg
        N = scores.shape[0]
        E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        sel = scores + self.bias[...]  # biased: SELECTION only
        if cfg.topk_group < G:
            gscore = jax.lax.top_k(sel.reshape(N, G, E // G), 2)[0].sum(-1)  # [N, G]
            _, gidx = jax.lax.top_k(gscore, cfg.topk_group)
            gmask = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], gidx].set(True)
            sel = jnp.where(jnp.repeat(gmask, E // G, axis=1), sel, -jnp.inf)
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(sel), K)
        return jnp.sort(idx, axis=-1).astype(jnp.int32)  # fixed slot order: ascending expert id

    def __call__(self, x: jax.Array) -> Routing:
        """x [N, D] -> Routing(scores [N, E], indices [N, K] int32 ascending, weights [N, K]), all fp32."""
        cfg = self.cfg
        logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        s = jax.nn.sigmoid(logits)  # affinities: give the WEIGHTS
        idx = self.select(s)
        w = jnp.take_along_axis(s, idx, axis=-1)
        if cfg.norm_topk_prob:
            w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
        return Routing(s, idx, w * jnp.float32(cfg.routed_scaling_factor))


def default_block_rows(M: int, E: int) -> int:
    """Rows per block for the block-sparse path: a power of two in [8, 256] with E*bm <= M/4, so the
    static bound of M + E*bm computed rows stays within ~25% of the M routed rows (big blocks keep
    the per-block weight gather small next to the block's matmul), but 64 where E*64 <= M/2: XLA:CPU's
    batched matmuls of fewer rows a block are much slower (the weight gradient's, which sums over the
    block's rows, at 32 rows a quarter of its speed at 64; docs/bench/README.md)."""
    bm = 8
    while bm < 256 and (E * bm * 2 * 4 <= M or (bm < 64 and E * bm * 2 * 2 <= M)):
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


# The block-sparse matmul gathers all its blocks' weights at once up to BLOCK_GATHER_BYTES, and
# beyond that a chunk of blocks of BLOCK_CHUNK_BYTES at a time (figures: _block_matmul).
BLOCK_GATHER_BYTES = 32 << 20
BLOCK_CHUNK_BYTES = 4 << 20


def _chunks(xs: tuple, bexp: jax.Array, w: jax.Array):
    """The blocks in n equal chunks of c: (c, n, the [nb, ...] arrays of xs and bexp padded to n*c
    blocks). Padding blocks are zero rows of expert 0."""
    nb, block = bexp.shape[0], w.shape[1] * w.shape[2] * w.dtype.itemsize
    n = 1 if nb * block <= BLOCK_GATHER_BYTES else -(-nb // max(1, BLOCK_CHUNK_BYTES // block))
    c = -(-nb // n)  # n chunks of equal size: fewer than n padding blocks
    pad = lambda a: jnp.pad(a, ((0, n * c - nb),) + ((0, 0),) * (a.ndim - 1))  # noqa: E731
    return c, n, tuple(map(pad, xs)), pad(bexp)


def _vma(a: jax.Array) -> frozenset:
    """The mesh axes a varies over inside shard_map (none outside): the abstract value's
    ``manual_axis_type.varying`` in jax 0.10 (``vma`` in earlier releases)."""
    t = jax.typeof(a)
    m = getattr(t, "manual_axis_type", None)
    return frozenset(m.varying) if m is not None else frozenset(getattr(t, "vma", ()))


def _sum_to(ct: jax.Array, like: jax.Array) -> jax.Array:
    """A cotangent summed over the mesh axes it varies over and its primal does not (the transpose of
    shard_map's implicit broadcast of an invariant value)."""
    extra = tuple(sorted(_vma(ct) - _vma(like)))
    return jax.lax.psum(ct, extra) if extra else ct


def _zeros(shape, dtype, *like) -> jax.Array:
    """Zeros that vary over the mesh axes any of ``like`` varies over (inside shard_map: a loop carry
    that the loop body's values update must have their type from the start)."""
    z = jnp.zeros(shape, dtype)
    axes = tuple(sorted(frozenset().union(*map(_vma, like))))
    return jax.lax.pcast(z, axes, to="varying") if axes else z


@jax.custom_vjp
def _block_matmul(xb: jax.Array, w: jax.Array, bexp: jax.Array) -> jax.Array:
    """xb [nb, bm, D] @ w[bexp] -> [nb, bm, F]: block g times its expert's weights w[bexp[g]] (w [E, D, F];
    D, F stand for any in/out widths).

    Forward and backward run over chunks of blocks in a loop (one chunk when all the gathered
    weights fit ``BLOCK_GATHER_BYTES``, else chunks of ``BLOCK_CHUNK_BYTES``), each chunk one batched
    matmul on its blocks' gathered weights; the backward gathers them again. Gathering a large
    [nb, D, F] at once is slow (the medium preset's 448 MiB per weight took longer than its matmul)
    and, as autodiff's residual, was held from the forward to the backward for every layer (XLA:CPU
    drops optimisation barriers, so a re-gather is merged with the forward's by CSE): 10.5 of the
    12.1 GiB of temporaries of the medium training step. Figures: docs/bench/README.md, "Measured
    choices in the code"."""
    c, n, (xp,), bp = _chunks((xb,), bexp, w)

    def chunk(_, i):
        blocks = lambda a: jax.lax.dynamic_slice_in_dim(a, i * c, c)  # noqa: E731
        return None, jnp.einsum("gmd,gdf->gmf", blocks(xp), w[blocks(bp)])

    _, y = jax.lax.scan(chunk, None, jnp.arange(n))
    return y.reshape(n * c, *y.shape[2:])[:bexp.shape[0]]


def _block_matmul_fwd(xb, w, bexp):
    return _block_matmul(xb, w, bexp), (xb, w, bexp)


def _block_matmul_bwd(res, g):
    xb, w, bexp = res
    c, n, (xp, gp), bp = _chunks((xb, g), bexp, w)

    def chunk(dw, i):
        blocks = lambda a: jax.lax.dynamic_slice_in_dim(a, i * c, c)  # noqa: E731
        be, gi = blocks(bp), blocks(gp)
        dx = jnp.einsum("gmf,gdf->gmd", gi, w[be])
        return dw.at[be].add(jnp.einsum("gmd,gmf->gdf", blocks(xp), gi)), dx

    dw, dx = jax.lax.scan(chunk, _zeros(w.shape, w.dtype, xp, gp, bp, w), jnp.arange(n))
    return _sum_to(dx.reshape(n * c, *dx.shape[2:])[:bexp.shape[0]], xb), _sum_to(dw, w), None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _blocksparse_swiglu(xs, sizes, w1, w2, w3, bm: int, rows=None):
    """Grouped SwiGLU on expert-sorted rows -> (yb [nb*bm, D] padded rows, pos [M] padded row of
    each sorted row).

    xs [M, D] sorted rows, or (with ``rows`` [M]) any [N, D] array gathered through rows, so the
    dispatch gather and the block gather are one. Block g holds expert bexp[g]; its weights are
    gathered and all blocks run as one batched matmul (``_block_matmul``).

    The padded-row -> source-row map is built by scatters, so XLA:CPU materialises it once:
    composed index arithmetic would be fused into the [nb*bm, D] gather and recomputed for every
    element (figures: docs/bench/README.md, "Measured choices in the code")."""
    M = xs.shape[0] if rows is None else rows.shape[0]
    D = xs.shape[1]
    bexp, pos = _block_layout(sizes, M, bm)
    P = bexp.shape[0] * bm
    src = jnp.zeros(P, jnp.int32).at[pos].set(jnp.arange(M, dtype=jnp.int32) if rows is None else rows)
    valid = jnp.zeros(P, bool).at[pos].set(True)                           # padding rows: zeros
    xb = jnp.where(valid[:, None], xs[src], 0).reshape(bexp.shape[0], bm, D)
    h = silu(_block_matmul(xb, w1, bexp)) * _block_matmul(xb, w3, bexp)
    yb = _block_matmul(h, w2, bexp).reshape(-1, D)
    return yb, pos


def default_chunk_rows(M: int, E: int) -> int:
    """Rows per chunk of the expert loop: the largest power of two in [8, 256] within half an expert's
    balanced share M/E (each expert computes its rows rounded up to whole chunks, so small chunks waste
    less and large ones run faster). Peer-small training (512 rows an expert) 256, the medium preset (192)
    64, a decoding step of 8 tokens (2) 8 (docs/bench/README.md, "Measured choices in the code")."""
    c = 8
    while c < 256 and 4 * c <= M // E:
        c *= 2
    return c


def _each_chunk(sizes: jax.Array, c: int, body, carry):
    """carry = body(e, start, row0, carry) for every chunk of every expert: expert e's rows are
    [start, start + sizes[e]) of the expert-sorted rows, its chunks start at row0 = start + j*c.
    Experts run in ascending order, so the rows a chunk writes past its expert's end (the last chunk's
    tail) belong to a later expert (or to the padding) and are written again by it."""
    starts = jnp.cumsum(sizes) - sizes

    def expert(e, carry):
        s = starts[e]
        return jax.lax.fori_loop(0, (sizes[e] + c - 1) // c, lambda j, cr: body(e, s, s + j * c, cr), carry)

    return jax.lax.fori_loop(0, sizes.shape[0], expert, carry)


def _swiglu_act(a: jax.Array, b: jax.Array) -> jax.Array:
    return silu(a) * b


def _rows(a: jax.Array, r, c: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, r, c)


def _put(a: jax.Array, v: jax.Array, r) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a, v, r, 0)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _loop_swiglu(xs, sizes, w1, w2, w3, c: int):
    """Grouped SwiGLU on expert-sorted rows xs [M, D] (expert e's rows the sizes[e] after the earlier
    experts' ones) -> [M, D]: a loop over experts and their chunks of c rows (``_each_chunk``), each
    chunk silu(x w1[e]) * (x w3[e]) then w2[e]. Rows past sum(sizes) (another shard's, under expert
    parallelism) are no expert's: they come out zero, or as a last chunk's tail, and get no gradient.

    Forward and backward are one loop each (the custom VJP): the backward zeroes the cotangent rows
    outside the chunk's expert, so a chunk's weight gradients sum its own rows only, and accumulates
    each expert's weight gradients in place; the forward keeps x w1 and x w3 for it (a call without a
    gradient, e.g. inference, does not)."""
    return _loop_forward(xs, sizes, w1, w2, w3, c, keep=False)[0]


def _loop_forward(xs, sizes, w1, w2, w3, c: int, keep: bool):
    """-> (y [M, D], xs padded by c rows, and with ``keep`` x w1 and x w3 of every row [M + c, F])."""
    M, D = xs.shape
    F = w1.shape[2]
    xp = jnp.pad(xs, ((0, c), (0, 0)))  # the last chunk may reach c - 1 rows past M

    def chunk(e, s, r, carry):
        x = _rows(xp, r, c)
        a, b = x @ w1[e], x @ w3[e]
        y = _put(carry[0], _swiglu_act(a, b) @ w2[e], r)
        return (y, _put(carry[1], a, r), _put(carry[2], b, r)) if keep else (y,)

    like = (xs, w1, w2, w3)
    init = (_zeros((M + c, D), xs.dtype, *like),)
    if keep:
        init += (_zeros((M + c, F), xs.dtype, *like), _zeros((M + c, F), xs.dtype, *like))
    with jax.named_scope("expert_loop"):  # the name profiles attribute the loop's kernels by
        y, *kept = _each_chunk(sizes, c, chunk, init)
    return (y[:M], xp, *kept)


def _loop_swiglu_fwd(xs, sizes, w1, w2, w3, c):
    y, xp, A, B = _loop_forward(xs, sizes, w1, w2, w3, c, keep=True)
    return y, (xp, A, B, sizes, w1, w2, w3)


def _loop_swiglu_bwd(c, res, g):
    xp, A, B, sizes, w1, w2, w3 = res
    M, D = g.shape
    gp = jnp.pad(g, ((0, c), (0, 0)))
    offsets = jnp.arange(c)
    # The weights transposed once, outside the loop, so each chunk's input-gradient products read them
    # as [in, out] (XLA:CPU ran them as transposed-operand products up to twice as slow; same values).
    w1t, w2t, w3t = (jnp.swapaxes(w, 1, 2) for w in (w1, w2, w3))

    def chunk(e, s, r, carry):
        dx, d1, d2, d3 = carry
        gy = jnp.where((r - s + offsets < sizes[e])[:, None], _rows(gp, r, c), 0)  # this expert's rows only
        x, a, b = _rows(xp, r, c), _rows(A, r, c), _rows(B, r, c)
        h, act_vjp = jax.vjp(_swiglu_act, a, b)
        da, db = act_vjp(gy @ w2t[e])
        d1 = d1.at[e].add(x.T @ da)
        d2 = d2.at[e].add(h.T @ gy)
        d3 = d3.at[e].add(x.T @ db)
        return _put(dx, da @ w1t[e] + db @ w3t[e], r), d1, d2, d3

    like = (xp, gp, A, B, w1, w2, w3)
    init = (_zeros((M + c, D), g.dtype, *like),) + tuple(_zeros(w.shape, w.dtype, *like) for w in (w1, w2, w3))
    with jax.named_scope("expert_loop"):
        dx, d1, d2, d3 = _each_chunk(sizes, c, chunk, init)
    return (_sum_to(dx[:M], xp), None, _sum_to(d1, w1), _sum_to(d2, w2), _sum_to(d3, w3))


_loop_swiglu.defvjp(_loop_swiglu_fwd, _loop_swiglu_bwd)


def _ragged_swiglu(xs, sizes, w1, w2, w3):
    """Grouped SwiGLU with jax.lax.ragged_dot (the reference grouped GEMM)."""
    h = silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
    return jax.lax.ragged_dot(h, w2, sizes)


class Experts(nnx.Module):
    """E routed SwiGLU experts stacked: w1, w3 [E, D, F], w2 [E, F, D] (Flax [in, out] per expert)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = normal_init(cfg.initializer_range)
        self.w1 = nnx.Param(init(rngs.params(), (E, D, F), dtype))
        self.w2 = nnx.Param(init(rngs.params(), (E, F, D), dtype))
        self.w3 = nnx.Param(init(rngs.params(), (E, D, F), dtype))
        self.impl = impl

    def resolved_impl(self) -> str:
        if self.impl != "auto":
            return self.impl
        return "loop" if jax.default_backend() == "cpu" else "ragged"

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array, impl: str | None = None) -> jax.Array:
        """x_sorted [M, D] grouped by expert, group_sizes [E] int32 -> y_sorted [M, D] (model dtype)."""
        M, E = x_sorted.shape[0], self.w1.shape[0]
        w1, w2, w3 = self.w1[...], self.w2[...], self.w3[...]
        impl = impl or self.resolved_impl()
        if impl == "ragged":
            return _ragged_swiglu(x_sorted, group_sizes, w1, w2, w3)
        if impl == "loop":
            return _loop_swiglu(x_sorted, group_sizes, w1, w2, w3, default_chunk_rows(M, E))
        if impl == "blocksparse":
            yb, pos = _blocksparse_swiglu(x_sorted, group_sizes, w1, w2, w3, default_block_rows(M, E))
            return yb[pos]
        raise ValueError(f"expert impl must be one of {EXPERT_IMPLS[1:]}, got {impl!r}")


class Dispatch(NamedTuple):
    order: jax.Array    # [M] position in the token-major flattening of [N, K], sorted by expert
    tokens: jax.Array   # [M] token id of each sorted row
    counts: jax.Array   # [E] rows per expert (int32)
    inverse: jax.Array  # [M] sorted row of each token-major position: order[inverse] = arange(M)
    dtype: Any          # the dtype of the dispatched x, that of the combined output


def stable_argsort(keys: jax.Array, bound: int) -> jax.Array:
    """``jnp.argsort(keys, stable=True)`` (int32) of int keys [M] in [0, bound): one sort of the unique
    int32 values key * M + position where they fit, the order read back as value % M. XLA:CPU sorts one
    array ~5x faster than argsort's stable sort of the keys with their positions (8,192 keys: 0.33 against
    1.63 ms; docs/bench/README.md, "Measured choices in the code")."""
    M = keys.shape[0]
    if bound * M > jnp.iinfo(jnp.int32).max:
        return jnp.argsort(keys, stable=True).astype(jnp.int32)
    return jax.lax.sort(keys.astype(jnp.int32) * M + jnp.arange(M, dtype=jnp.int32)) % M


def sort_by_expert(indices: jax.Array, n_experts: int, dtype=jnp.float32) -> Dispatch:
    """Sort (token, slot) pairs by expert; within an expert by token (stable)."""
    K = indices.shape[1]
    flat = indices.reshape(-1)                                 # [M] expert of pair (n, k)
    order = stable_argsort(flat, n_experts)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    counts = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    return Dispatch(order, (order // K).astype(jnp.int32), counts, inverse, dtype)


class LocalDispatcher(nnx.Module):
    """Single-device dispatch and combine: the (token, slot) rows sorted by expert, and back.

    The interface an expert-parallel dispatcher implements:
      dispatch(x [N, D], routing) -> (x_sorted [M, D], group_sizes [E], plan)   (plan.counts [E])
      compute(experts, x_sorted, group_sizes) -> y_sorted [M, D]
      combine(y_sorted [M, D], plan, routing) -> y [N, D] (in the dtype of the dispatched x)
    An nnx.Module (no variables) so that ``scheme`` is part of the graph: nnx.jit retraces when it changes.
    scheme: "grouped" (default) or "eager" (bit parity with HF eager experts in bf16).
    gspmd: the rows are spread over the devices of a mesh without an expert axis and GSPMD partitions
    the layer (``dsv3_jax.expert_parallel.use_expert_parallel`` sets it). The experts' "auto" then
    runs block-sparse instead of the loop: GSPMD splits the batch of blocks over the devices, but not
    the loop's chunks at data-dependent rows, which it would run whole on every device with each
    expert's weights gathered inside the loop.
    """

    def __init__(self, n_experts: int, top_k: int, scheme: str = "grouped", gspmd: bool = False):
        if scheme not in COMBINES:
            raise ValueError(f"combine scheme must be one of {COMBINES}, got {scheme!r}")
        self.n_experts, self.top_k, self.scheme, self.gspmd = n_experts, top_k, scheme, gspmd

    def dispatch(self, x: jax.Array, routing: Routing) -> tuple[jax.Array, jax.Array, Dispatch]:
        d = sort_by_expert(routing.indices, self.n_experts, x.dtype)
        return x[d.tokens], d.counts, d

    def compute(self, experts: "Experts", x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """The experts on the dispatched rows (here: all experts, all rows; an expert-parallel
        dispatcher runs each shard's experts on its own rows)."""
        impl = experts.resolved_impl()
        return experts(x_sorted, group_sizes, "blocksparse" if self.gspmd and impl == "loop" else impl)

    def combine(self, y_sorted: jax.Array, plan: Dispatch, routing: Routing) -> jax.Array:
        """Weighted sum over slots. Slots are in ascending expert id, so a running sum over k
        reproduces HF's eager order."""
        N, K = routing.indices.shape
        y = y_sorted[plan.inverse].reshape(N, K, -1)             # back to (token, slot) order
        w, dt = routing.weights, plan.dtype
        if self.scheme == "grouped":
            acc = y[:, 0].astype(jnp.float32) * w[:, 0, None]
            for k in range(1, K):
                acc = acc + y[:, k].astype(jnp.float32) * w[:, k, None]
            return acc.astype(dt)
        if self.scheme == "eager":
            acc = jnp.zeros(y.shape[::2], dt)
            for k in range(K):
                acc = acc + (y[:, k].astype(jnp.float32) * w[:, k, None]).astype(dt)
            return acc
        raise ValueError(f"combine scheme must be one of {COMBINES}, got {self.scheme!r}")


def sequence_balance_loss(s: jax.Array, K: int, valid: jax.Array | None = None) -> jax.Array:
    """Sequence-wise balance loss sum_i f_i P_i averaged over sequences (Paper eqs. 17-20; docs/reference.md §8.2).

    s [B, T, E] unbiased fp32 scores. f_i counts the top-K of s (no bias, no group limit) and has no
    gradient; P_i, the mean normalised score, is the only gradient path. Multiply by alpha outside.
    valid: None or [B, T] bool: each sequence is then its real tokens only (T_b of them), and
    sequences without any are left out of the average.
    """
    if valid is not None:
        return _masked_balance_loss(s, K, valid)
    B, T, E = s.shape
    _, top = jax.lax.top_k(jax.lax.stop_gradient(s), K)                          # [B, T, K]
    hits = jnp.sum(jax.nn.one_hot(top, E, dtype=jnp.float32), axis=(1, 2))       # [B, E]
    f = jax.lax.stop_gradient(hits * (E / (K * T)))
    P = jnp.mean(s / jnp.sum(s, axis=-1, keepdims=True), axis=1)                # [B, E]
    return jnp.mean(jnp.sum(f * P, axis=-1))


def _masked_balance_loss(s: jax.Array, K: int, valid: jax.Array) -> jax.Array:
    """sequence_balance_loss over the valid tokens of each row (T_b = valid.sum(1))."""
    B, T, E = s.shape
    w = valid.astype(jnp.float32)                                                # [B, T]
    n = jnp.sum(w, axis=1)                                                       # [B] T_b
    has = n > 0
    n = jnp.maximum(n, 1.0)
    _, top = jax.lax.top_k(jax.lax.stop_gradient(s), K)                          # [B, T, K]
    hits = jnp.sum(jax.nn.one_hot(top, E, dtype=jnp.float32) * w[:, :, None, None], axis=(1, 2))  # [B, E]
    f = jax.lax.stop_gradient(hits * jnp.float32(E / K) / n[:, None])
    P = jnp.sum(s / jnp.sum(s, axis=-1, keepdims=True) * w[:, :, None], axis=1) / n[:, None]  # [B, E]
    per_row = jnp.sum(f * P, axis=-1)
    return jnp.sum(jnp.where(has, per_row, 0.0)) / jnp.maximum(jnp.sum(has), 1).astype(jnp.float32)


def masked_counts(indices: jax.Array, n_experts: int, valid: jax.Array) -> jax.Array:
    """(token, slot) assignments per expert [E] int32 of the valid tokens only: indices [N, K], valid [N] bool.
    Static shapes: a padded token's slots are counted in an extra bin E, dropped."""
    flat = jnp.where(valid[:, None], indices, n_experts).reshape(-1)
    return jnp.bincount(flat, length=n_experts + 1)[:n_experts].astype(jnp.int32)


class MoEOutput(NamedTuple):
    out: jax.Array     # [B, T, D] model dtype
    counts: jax.Array  # [E] int32 (token, slot) assignments
    scores: jax.Array  # [B, T, E] fp32 unbiased affinities (for the balance loss)


class MoE(nnx.Module):
    """Routed experts (dropless, grouped by expert) + shared experts: route -> dispatch -> compute -> combine.
    Never changes the bias."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, impl: str = "auto",
                 combine: str = "grouped", rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, impl=impl, rngs=rngs)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size,
                                      cfg, dtype=dtype, rngs=rngs)
        else:
            self.shared_experts = None
        self.dispatcher = LocalDispatcher(cfg.n_routed_experts, cfg.num_experts_per_tok, combine)

    def route(self, x: jax.Array) -> Routing:
        """x [N, D] -> Routing (fp32)."""
        return self.gate(x)

    def dispatch(self, x: jax.Array, routing: Routing):
        """x [N, D] -> (x_sorted [M, D], group_sizes [E], plan): the dispatcher's."""
        return self.dispatcher.dispatch(x, routing)

    def compute(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Expert-sorted rows -> y_sorted [M, D] (grouped SwiGLU, run where the dispatcher places it)."""
        return self.dispatcher.compute(self.experts, x_sorted, group_sizes)

    def combine(self, y_sorted: jax.Array, plan: Dispatch, routing: Routing) -> jax.Array:
        """y_sorted [M, D] -> y [N, D]: the weighted sum over each token's K slots (the dispatcher's)."""
        return self.dispatcher.combine(y_sorted, plan, routing)

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> MoEOutput:
        """x [B, T, D] -> MoEOutput(out [B, T, D], counts [E], scores [B, T, E]).

        valid: None or [B, T] bool, the real (not padded) tokens: padded tokens are still computed
        (don't-care outputs, static shapes) but never reach the counts."""
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        r = self.route(xf)
        xs, sizes, plan = self.dispatch(xf, r)
        y = self.combine(self.compute(xs, sizes), plan, r)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        counts = plan.counts if valid is None else masked_counts(r.indices, self.cfg.n_routed_experts,
                                                                 valid.reshape(-1))
        return MoEOutput(y.reshape(B, T, D), counts, r.scores.reshape(B, T, -1))
