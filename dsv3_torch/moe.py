"""DeepSeekMoE with auxiliary-loss-free balancing (Paper §2.1.2, §2.2; docs/reference.md §4, §8.2).

Shape legend: B batch, T time, N = B*T tokens, D model width, E routed experts,
K experts per token, G expert groups, F expert width, M = N*K (token, slot) rows.

The layer is four named steps (MoE.route -> dispatch -> compute -> combine);
dispatch and combine sit behind one dispatcher object (``LocalDispatcher``,
single device), so an expert-parallel dispatcher can replace it without
touching the router or the experts' maths:

1. route    (Router):  fp32 sigmoid affinities s; selection on s + bias,
                       group-limited; weights from the UNBIASED s -> Routing;
2. dispatch (LocalDispatcher.dispatch): (token, slot) pairs sorted by expert,
                       so each expert's rows are contiguous — dropless, no
                       capacity, no expert ever sees a token that did not
                       choose it -> (x_sorted, group_sizes, plan);
3. compute  (Experts): per-expert SwiGLU on its contiguous rows -> y_sorted;
4. combine  (LocalDispatcher.combine): the weighted sum over the K slots.

Pinned numerics (docs/reference.md §4.2, §4.5, §9.2):
* router in fp32 throughout (weight and bias are fp32 even in a bf16 model);
* the K selected indices are SORTED, so every fp32 sum over slots (the weight
  normalisation, the combine) runs in a fixed order;
* "grouped" combine (default): out_bf16 * w_fp32 in fp32, fp32 sum over the K
  slots in slot order, one cast;  "eager" combine (HF eager bit parity): each
  slot's product cast to the model dtype, then a model-dtype running sum per
  token in ascending expert id.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.types import Routing
from dsv3_torch import cpu_matmul
from dsv3_torch.cpu_matmul import mm
from dsv3_torch.layers import compute_dtype, linear

COMBINES = ("grouped", "eager")


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.w1 = linear(dim, inter, dtype, device)
        self.w2 = linear(inter, dim, dtype, device)
        self.w3 = linear(dim, inter, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Group-limited top-K over sigmoid affinities with a selection-only bias."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        # fp32 whatever the model dtype (docs/reference.md §4.2).
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32, device=device))
        # Correction bias b: selection only, no gradient, outside the optimizer
        # (a persistent buffer); changed only by DeepSeekV3.update_router_bias.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .bfloat16() / .cuda() go through _apply: devices move, dtypes stay fp32."""
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
            if self.weight.grad is not None:
                self.weight.grad = self.weight.grad.float()
        if self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, E] fp32 scores -> [N, K] expert ids, ascending (bias + group limit)."""
        N, E, G = scores.shape[0], self.cfg.n_routed_experts, self.cfg.n_group
        biased = scores.detach() + self.bias.float()
        if self.cfg.topk_group < G:  # else every group is kept
            group_score = _top2_sum(biased.view(N, G, E // G))  # [N, G]
            top_groups = group_score.topk(self.cfg.topk_group, dim=-1).indices
            keep = torch.zeros(N, G, dtype=torch.bool, device=scores.device).scatter_(1, top_groups, True)
            # -inf, not 0: a bias trained from zero can go negative (docs/reference.md §4.1).
            biased = biased.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = biased.topk(self.cfg.num_experts_per_tok, dim=-1).indices
        return idx.sort(dim=-1).values  # fixed slot order for deterministic fp32 sums

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, D] (any dtype) -> Routing, all fp32."""
        scores = cpu_matmul.linear(x.float(), self.weight.float()).sigmoid()
        idx = self.select(scores)
        w = scores.gather(1, idx)
        if self.cfg.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(scores, idx, w * self.cfg.routed_scaling_factor)


def _top2_sum(v: torch.Tensor) -> torch.Tensor:
    """v [..., n] (n >= 2) -> [...]: the sum of each row's two largest values, ``v.topk(2).values.sum(-1)``
    bit for bit (a sum of two values; a tied maximum counts twice, as in topk), by two max reductions,
    the first's position set to -inf for the second. topk over many short rows is slow on the CPU: on
    [2048, 4, 4] 0.28 ms against 0.10, on V3's [2048, 8, 32] 2.7 ms against 0.9 (docs/bench/README.md)."""
    first, at = v.max(dim=-1, keepdim=True)
    second = v.scatter(-1, at, float("-inf")).amax(dim=-1, keepdim=True)
    return (first + second).squeeze(-1)


class Dispatch(NamedTuple):
    order: torch.Tensor   # [M] position in the slot-major flattening of [K, N], sorted by expert
    tokens: torch.Tensor  # [M] token id of each sorted row
    counts: torch.Tensor  # [E] rows per expert (int64)
    inverse: torch.Tensor  # [M] sorted row of each slot-major position: order[inverse] = arange(M)
    dtype: torch.dtype     # the dtype of the dispatched x, that of the combined output


def sort_by_expert(indices: torch.Tensor, n_experts: int, dtype: torch.dtype = torch.float32) -> Dispatch:
    """Sort (token, slot) pairs by expert; within an expert by (slot, token), as HF eager."""
    N = indices.shape[0]
    flat = indices.t().reshape(-1)  # slot-major: row j is slot j // N of token j % N
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Dispatch(order, order % N, _expert_counts(flat, n_experts), inverse, dtype)


def _expert_counts(flat: torch.Tensor, n_experts: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Assignments per expert [E] int64 of the expert ids flat [M] (only where valid [M] bool, if given).

    A scatter-add into E slots rather than ``bincount``: its [E] output has a fixed shape, so
    torch.compile traces it into the graph (bincount's output length depends on the data)."""
    ones = torch.ones_like(flat) if valid is None else valid.to(flat.dtype)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, ones)


class _GatherTokens(torch.autograd.Function):
    """x [N, D] -> x[tokens] [M, D], the (token, slot) rows in expert-sorted order.

    backward: each token's gradient is the sum of its K rows, taken slot by slot
    (a gather of N rows per slot, added in slot order: fixed, no atomics)
    instead of autograd's scatter-add of all M rows into a zero tensor.
    """

    @staticmethod
    def forward(ctx, x, tokens, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, tokens)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        n = inverse.numel() // ctx.k
        gx = g.index_select(0, inverse[:n])
        for j in range(1, ctx.k):
            gx.add_(g.index_select(0, inverse[j * n:(j + 1) * n]))
        return gx, None, None, None


class _Combine(torch.autograd.Function):
    """The "grouped" combine: y = sum_k out[slot k] * w[k] in fp32, slots in order.

    Inputs: w [K, N] fp32 combine weights (slot-major), the Dispatch
    permutation and the experts' outputs out [M, D] (model dtype,
    expert-sorted rows). Slot by slot, N rows are gathered from out,
    multiplied by the fp32 weights and added in slot order (slot 0 first) --
    the values of ``(out * w)[inverse].view(K, N, D).sum(0)`` without its
    [K, N, D] temporaries. The backward is gathers too:
    d out[j] = g[token j] * w[j] (cast to the model dtype) and
    d w[j] = g[token j] . out[j] (fp32).
    """

    @staticmethod
    def forward(ctx, w, order, inverse, tokens, out):
        K, N = w.shape
        y = out.index_select(0, inverse[:N]) * w[0, :, None]
        for k in range(1, K):
            y.add_(out.index_select(0, inverse[k * N:(k + 1) * N]) * w[k, :, None])
        ctx.save_for_backward(w, order, inverse, tokens, out)
        return y

    @staticmethod
    def backward(ctx, g):
        w, order, inverse, tokens, out = ctx.saved_tensors
        gs = g.index_select(0, tokens)                     # [M, D]: d y of each sorted row's token
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = (gs * out).sum(-1).index_select(0, inverse).view_as(w)  # sorted rows -> slot-major [K, N]
        gs.mul_(w.reshape(-1).index_select(0, order)[:, None])
        return grad_w, None, None, None, gs.to(out.dtype)


class Experts(nn.Module):
    """E SwiGLU experts stacked: w1, w3 [E, F, D], w2 [E, D, F].

    forward runs each expert only on its own contiguous rows: a loop of
    per-expert matmuls over their slices. It was measured against a
    slice/index loop, a block-padded bmm and ``torch._grouped_mm`` (whose CPU
    fp32 backward raises in torch 2.13); all agree exactly with the loop in
    fp32 and bf16 (figures: docs/bench/README.md, "Measured choices in the code").
    In eager mode (training and inference, in any dtype, also under autocast) the same per-expert products
    run in ``grouped_swiglu``, which writes them into whole [M, *] and [E, *, *] buffers: autograd's loop
    would cat the experts' outputs and input gradients and stack each weight's per-expert gradients, a
    copy of every weight gradient each step (and the outputs' cat without a gradient).
    """

    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device=None):
        super().__init__()
        E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, F_, D, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(E, D, F_, dtype=dtype, device=device))
        self.w3 = nn.Parameter(torch.empty(E, F_, D, dtype=dtype, device=device))

    def forward(self, x_sorted: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """x_sorted [M, D] grouped by expert, group_sizes [E] (host ints; symbols under torch.compile)
        -> y_sorted [M, D].

        Under torch.compile, autograd's loop over every expert's split() slice (unbind for the weights):
        their backward is one cat/stack, where E slices would each allocate a full-size zero gradient.
        """
        w1, w2, w3 = weights_for(x_sorted, self.w1, self.w2, self.w3)
        if not torch.compiler.is_compiling():
            return grouped_swiglu(x_sorted, w1, w2, w3, group_sizes)
        pad = cpu_matmul.row_multiple(x_sorted, w1.dtype)
        return torch.cat([_swiglu(x, w1_, w2_, w3_, pad) for x, w1_, w2_, w3_ in
                          zip(x_sorted.split(group_sizes), w1.unbind(0), w2.unbind(0), w3.unbind(0))])


def weights_for(x: torch.Tensor, *weights: torch.Tensor) -> tuple:
    """The stacked expert weights in the dtype a matmul on x computes in (``compute_dtype``). Under autocast
    each is cast once, not once per expert slice (a slice is no leaf, so autocast's cast cache would not
    hold it) with a cast-back per slice in backward."""
    dtype = compute_dtype(x)
    return tuple(w if w.dtype == dtype else w.to(dtype) for w in weights)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """One expert on its rows x [n, D] -> [n, D], computed zero-padded to a multiple of ``multiple`` rows
    (under torch.compile, where n is a symbol: every expert, however few its rows).

    The pad rows' outputs are cut off, so their output gradients are zero and they add nothing to the
    weight gradients; the real rows' products are those of the unpadded call."""
    if multiple > 1:
        n = x.shape[0]
        return _swiglu(F.pad(x, (0, 0, 0, -n % multiple)), w1, w2, w3)[:n]
    return cpu_matmul.linear(F.silu(cpu_matmul.linear(x, w1)) * cpu_matmul.linear(x, w3), w2)


def _row_padding(n: int, multiple: int) -> int:
    """The zero rows an expert of n rows is computed with: up to a multiple of ``multiple`` above it."""
    return -n % multiple if n > multiple else 0


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                   sizes: list[int]) -> torch.Tensor:
    """The per-expert SwiGLU of x [M, D] grouped by expert (sizes [E] host ints) with stacked w1, w3
    [E, F, D] and w2 [E, D, F] of one dtype, in eager mode -> y [M, D] in the weights' dtype, written into
    one buffer by slice: recording a gradient, by ``_GroupedSwiGLU``; without one (inference, prefill,
    decoding), by the same products with nothing kept. Both equal autograd's loop over ``_swiglu`` bit for
    bit (tested), also where x is fp32 and the weights bf16 (autocast): x's rows are cast once, where each
    of the loop's products casts its own.

    Where oneDNN computes the products (``cpu_matmul.row_multiple``), each expert's products have the
    row count ``_swiglu`` pads them to (``_expert_windows``)."""
    windows = _expert_windows(sizes, cpu_matmul.row_multiple(x, w1.dtype))
    if torch.is_grad_enabled():
        return _GroupedSwiGLU.apply(x, w1, w2, w3, windows)
    return _swiglu_into_buffers(x.to(w1.dtype), w1, w2, w3, windows, keep=False)[0]


class _Window(NamedTuple):
    """One expert's rows [start, start + n) of the expert-sorted rows, computed on ``rows`` rows."""
    expert: int
    start: int
    n: int
    rows: int  # n + _row_padding(n, multiple)


def _expert_windows(sizes: list[int], multiple: int) -> list[_Window]:
    """The experts with rows, in ascending order, each with the row count its products are computed on."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append(_Window(e, start, n, n + _row_padding(n, multiple)))
            start += n
    return out


def _window_rows(t: torch.Tensor, w: _Window) -> torch.Tensor:
    """The ``w.rows`` rows an expert's products take from t [M, *]: its own rows and the ones after them
    (a later expert's, or rows of no expert) where those exist, a view; else (the last experts') its own
    rows zero-padded, a copy. The rows past the expert's own are don't-care: each product's row depends on
    its own row only, and the backward zeroes their factors before any sum over rows."""
    if w.start + w.rows <= t.shape[0]:
        return t[w.start:w.start + w.rows]
    return F.pad(t[w.start:w.start + w.n], (0, 0, 0, w.rows - w.n))


def _put(buf: torch.Tensor, w: _Window, a: torch.Tensor, b=None) -> None:
    """Write an expert's result rows into buf [M, *] at its own rows: a (or a + b), of its window's rows.
    A wider buf (fp32 for bf16 products) gets a + b added in its own dtype, as autograd adds the
    gradients of two casts of one input."""
    r = slice(w.start, w.start + w.n)
    if b is None:
        buf[r].copy_(a[:w.n])
    elif a.dtype == buf.dtype:
        torch.add(a[:w.n], b[:w.n], out=buf[r])
    else:
        buf[r].copy_(a[:w.n]).add_(b[:w.n])


def _product_into(buf: torch.Tensor, w: _Window, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [rows, K] · b [K, N] written into buf's rows of the expert; returns the whole product (written by
    mm itself where the window is the expert's rows)."""
    if w.rows == w.n:
        return mm(a, b, out=buf[w.start:w.start + w.n])
    y = mm(a, b)
    _put(buf, w, y)
    return y


def _swiglu_into_buffers(x, w1, w2, w3, windows, keep: bool):
    """-> (y [M, D], x w1ᵀ [M, F], x w3ᵀ [M, F]), the last two only if ``keep`` (else None): each expert's
    products written into its rows. Without ``keep`` the SiLU and the product run in place on the
    expert's own temporary (the same kernels, the same values)."""
    M, F_ = x.shape[0], w1.shape[1]
    y = x.new_empty(x.shape)
    a_all, b_all = (x.new_empty(M, F_), x.new_empty(M, F_)) if keep else (None, None)
    for w in windows:
        e, xe = w.expert, _window_rows(x, w)
        if keep:
            a, b = _product_into(a_all, w, xe, w1[e].t()), _product_into(b_all, w, xe, w3[e].t())
            h = F.silu(a) * b
        else:
            h = F.silu(mm(xe, w1[e].t()), inplace=True).mul_(mm(xe, w3[e].t()))
        _product_into(y, w, h, w2[e].t())
    y[sum(w.n for w in windows):].zero_()  # rows past the experts' (none where sizes sum to M)
    return y, a_all, b_all


class _GroupedSwiGLU(torch.autograd.Function):
    """x_sorted [M, D] grouped by expert, stacked w1, w3 [E, F, D] and w2 [E, D, F], the experts'
    ``_expert_windows`` -> y_sorted [M, D]: ``Experts.forward``'s per-expert SwiGLU, the same products in
    the same order (outputs and gradients bit-identical to autograd's loop, tested), written into whole
    buffers by slice instead of cat and stack.

    x may be wider than the weights (fp32 rows, bf16 weights under autocast): its rows are cast once, and
    its gradient comes back in its own dtype, each expert's two input-gradient products added there (as
    autograd adds the gradients of the loop's two casts of each slice).

    forward keeps x w1 and x w3 of every row [M, F] for the backward (autograd's loop kept those and
    silu(x w1) and the SwiGLU product besides); backward recomputes silu and the product from them.
    In a window longer than the expert, the backward zeroes the extra rows of the SwiGLU product and of
    the gradients of x w1 and x w3 before the weight-gradient products, so they add exact zeros (a
    non-finite row of x or of the output gradient there would still reach the expert's weight gradients:
    such a step's loss is not finite either). An expert without rows gets zero weight gradients, as from
    autograd's stack."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, windows):
        ctx.windows, ctx.x_dtype = windows, x.dtype
        x = x.to(w1.dtype)
        y, a_all, b_all = _swiglu_into_buffers(x, w1, w2, w3, windows, keep=True)
        ctx.save_for_backward(x, w1, w2, w3, a_all, b_all)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w1, w2, w3, a_all, b_all = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4])
        gx = torch.empty_like(x, dtype=ctx.x_dtype) if need_x else None
        g1, g2, g3 = (torch.empty_like(w) for w in (w1, w2, w3)) if need_w else (None, None, None)
        if need_w:
            for e in sorted(set(range(w1.shape[0])) - {w.expert for w in ctx.windows}):
                for g in (g1, g2, g3):
                    g[e].zero_()
        for w in ctx.windows:
            e = w.expert
            a, b, g_e, x_e = (_window_rows(t, w) for t in (a_all, b_all, gy, x))
            sa = F.silu(a)
            dh = mm(g_e, w2[e])
            da, db = torch.ops.aten.silu_backward(dh * b, a), dh * sa
            if need_w:
                h = sa * b
                if w.rows > w.n:  # the window's rows past the expert's own add nothing
                    for t in (h, da, db):
                        t[w.n:].zero_()
                mm(g_e.t(), h, out=g2[e])
                mm(da.t(), x_e, out=g1[e])
                mm(db.t(), x_e, out=g3[e])
            if need_x:
                _put(gx, w, mm(da, w1[e]), mm(db, w3[e]))
        if need_x:
            gx[sum(w.n for w in ctx.windows):].zero_()
        return gx, g1, g2, g3, None


def group_sizes(counts: torch.Tensor, rows: int) -> list[int]:
    """counts [E] (summing to rows) -> the host ints split() takes.

    Under torch.compile (with ``capture_scalar_outputs``) each count is a data-dependent symbol;
    the last is written as rows minus the others, so that the split rows' total is the static
    ``rows`` and the code after the experts needs no guard on data."""
    sizes = counts.tolist()
    if torch.compiler.is_compiling() and sizes:
        sizes[-1] = rows - sum(sizes[:-1])
    return sizes


class LocalDispatcher:
    """Single-device dispatch and combine: the (token, slot) rows sorted by expert, and back.

    The interface an expert-parallel dispatcher implements:
      dispatch(x [N, D], routing) -> (x_sorted [M, D], group_sizes [E], plan)
      compute(experts, x_sorted, group_sizes) -> y_sorted [M, D]
      combine(y_sorted [M, D], plan, routing) -> y [N, D] (in the dtype of the dispatched x)
    group_sizes are host ints here (torch's split needs them), an int32 array in dsv3_jax.
    scheme: "grouped" (default) or "eager" (bit parity with HF eager experts in bf16).
    """

    def __init__(self, n_experts: int, top_k: int, scheme: str = "grouped"):
        if scheme not in COMBINES:
            raise ValueError(f"combine scheme must be one of {COMBINES}, got {scheme!r}")
        self.n_experts, self.top_k, self.scheme = n_experts, top_k, scheme

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, list[int], Dispatch]:
        d = sort_by_expert(routing.indices, self.n_experts, x.dtype)
        xs = _GatherTokens.apply(x, d.tokens, d.inverse, self.top_k)  # [M, D] expert-sorted
        return xs, group_sizes(d.counts, xs.shape[0]), d

    def compute(self, experts: "Experts", x_sorted: torch.Tensor, group_sizes) -> torch.Tensor:
        """The experts on the dispatched rows (here: all experts, all rows; an expert-parallel
        dispatcher runs each shard's experts on its own rows)."""
        return experts(x_sorted, group_sizes)

    def combine(self, y_sorted: torch.Tensor, plan: Dispatch, routing: Routing) -> torch.Tensor:
        N, D = routing.indices.shape[0], y_sorted.shape[1]
        if self.scheme == "grouped":
            if y_sorted.shape[0] == 0:
                return y_sorted.new_zeros(N, D, dtype=plan.dtype)
            return _Combine.apply(routing.weights.t(), plan.order, plan.inverse, plan.tokens,
                                  y_sorted).to(plan.dtype)
        if self.scheme == "eager":
            w = routing.weights.t().reshape(-1)[plan.order]         # [M] fp32, sorted like y_sorted
            y = y_sorted.new_zeros(N, D, dtype=plan.dtype)
            start = 0
            for n in plan.counts.tolist():  # ascending expert id; one add per token per expert
                if n:
                    rows = slice(start, start + n)
                    y = y.index_add(0, plan.tokens[rows], (y_sorted[rows] * w[rows, None]).to(y.dtype))
                    start += n
            return y
        raise ValueError(f"combine scheme must be one of {COMBINES}, got {self.scheme!r}")


class MoEOutput(NamedTuple):
    out: torch.Tensor     # [B, T, D] model dtype
    counts: torch.Tensor  # [E] int64 (token, slot) assignments
    scores: torch.Tensor  # [B, T, E] fp32 unbiased affinities (for the balance loss)


class MoE(nn.Module):
    """Routed experts (dropless, grouped by expert) + shared experts: route -> dispatch -> compute -> combine."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None, combine: str = "grouped"):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg, device)
        self.experts = Experts(cfg, dtype, device)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, dtype, device)
                               if cfg.n_shared_experts else None)
        self.dispatcher = LocalDispatcher(cfg.n_routed_experts, cfg.num_experts_per_tok, combine)

    def route(self, x: torch.Tensor) -> Routing:
        """x [N, D] -> Routing (fp32)."""
        return self.gate(x)

    def dispatch(self, x: torch.Tensor, routing: Routing):
        """x [N, D] -> (x_sorted [M, D], group_sizes [E], plan): the dispatcher's."""
        return self.dispatcher.dispatch(x, routing)

    def compute(self, x_sorted: torch.Tensor, group_sizes) -> torch.Tensor:
        """Expert-sorted rows -> y_sorted [M, D] (grouped SwiGLU, run where the dispatcher places it)."""
        return self.dispatcher.compute(self.experts, x_sorted, group_sizes)

    def combine(self, y_sorted: torch.Tensor, plan, routing: Routing) -> torch.Tensor:
        """y_sorted [M, D] -> y [N, D]: the weighted sum over each token's K slots (the dispatcher's)."""
        return self.dispatcher.combine(y_sorted, plan, routing)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> MoEOutput:
        """x [B, T, D] -> MoEOutput. Never changes the router bias.

        valid: None or [B, T] bool, the real (not padded) tokens: padded tokens are still computed
        (don't-care outputs) but never reach the counts."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        r = self.route(flat)
        xs, sizes, plan = self.dispatch(flat, r)
        y = self.combine(self.compute(xs, sizes), plan, r)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        counts = plan.counts if valid is None else masked_counts(r.indices, self.cfg.n_routed_experts,
                                                                 valid.reshape(-1))
        return MoEOutput(y.view(B, T, D), counts, r.scores.view(B, T, -1))


def masked_counts(indices: torch.Tensor, n_experts: int, valid: torch.Tensor) -> torch.Tensor:
    """(token, slot) assignments per expert [E] int64 of the valid tokens only: indices [N, K], valid [N] bool."""
    return _expert_counts(indices.reshape(-1), n_experts, valid[:, None].expand_as(indices).reshape(-1))


def sequence_balance_loss(scores: torch.Tensor, top_k: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i, averaged over sequences (Paper eqs. 17-20).

    scores [B, T, E] fp32 unbiased affinities. f_i counts the top-K of the
    UNBIASED scores, without bias or group limit (no gradient); P_i is the mean
    normalised score (the only gradient path). Multiply by alpha outside.
    valid: None or [B, T] bool: each sequence is then its real tokens only (T_b of
    them), and sequences without any are left out of the average.
    """
    if valid is not None:
        return _masked_balance_loss(scores, top_k, valid)
    B, T, E = scores.shape
    with torch.no_grad():
        idx = scores.topk(top_k, dim=-1).indices
        hits = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
        hits.scatter_add_(1, idx.reshape(B, -1), torch.ones_like(idx.reshape(B, -1), dtype=scores.dtype))
        f = hits * (E / (top_k * T))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()


def _masked_balance_loss(scores: torch.Tensor, top_k: int, valid: torch.Tensor) -> torch.Tensor:
    """sequence_balance_loss over the valid tokens of each row (T_b = valid.sum(1))."""
    B, T, E = scores.shape
    w = valid.to(scores.dtype)                              # [B, T]
    n = w.sum(1)                                            # [B] T_b
    has = n > 0
    n = n.clamp(min=1)
    with torch.no_grad():
        idx = scores.topk(top_k, dim=-1).indices            # [B, T, K]
        hits = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
        hits.scatter_add_(1, idx.reshape(B, -1), w[:, :, None].expand(B, T, top_k).reshape(B, -1))
        f = hits * (E / top_k) / n[:, None]
    p = ((scores / scores.sum(-1, keepdim=True)) * w[:, :, None]).sum(1) / n[:, None]  # [B, E]
    per_row = (f * p).sum(-1)
    return torch.where(has, per_row, 0.0).sum() / has.sum().clamp(min=1)
