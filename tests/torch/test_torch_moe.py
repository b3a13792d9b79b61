"""Router, dropless grouped MoE, balance loss and the bias update (docs/reference.md §4, §8)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3_torch
from dsv3 import ModelConfig
from dsv3_torch.moe import MoE, sequence_balance_loss, sort_by_expert

# 16 experts in 4 groups of 4, 2 groups kept, 3 per token: the group limit binds often.
CFG = ModelConfig.preset("tiny").replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)


def _moe(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        moe.gate.bias.uniform_(0, 0.2)
    return moe


def _experts(sizes, seed, dtype=torch.float32):
    """Experts for len(sizes) experts with N(0, 0.2) weights."""
    from dsv3_torch.moe import Experts

    ex = Experts(CFG.replace(n_routed_experts=len(sizes)), dtype=dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.2)
    return ex


def _loop_reference(x, sizes, w1, w2, w3):
    """Autograd's loop over the experts with rows: _swiglu on each expert's slice, then cat."""
    from dsv3_torch.moe import _swiglu

    return torch.cat([_swiglu(xe, a, b, c) for xe, a, b, c, n in
                      zip(x.split(sizes), w1.unbind(0), w2.unbind(0), w3.unbind(0), sizes) if n])


# the experts' dtypes: bf16 weights, fp32 weights under bf16 autocast, fp32
DTYPE_MODES = pytest.mark.parametrize("weights,autocast", [(torch.bfloat16, False), (torch.float32, True),
                                                           (torch.float32, False)],
                                      ids=["bf16-weights", "bf16-autocast", "fp32"])


def _reference_route(s, bias, cfg):
    """Per-token python loops: group scores, kept groups, top-K, unbiased weights."""
    E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    per = E // G
    sel = (s + bias).tolist()
    groups = sorted(range(G), key=lambda g: -sum(sorted(sel[g * per:(g + 1) * per])[-2:]))[: cfg.topk_group]
    cand = [e for e in range(E) if e // per in groups]
    idx = sorted(sorted(cand, key=lambda e: -sel[e])[:K])
    w = [s[e].item() for e in idx]
    total = sum(w) + 1e-20
    return idx, [wi / total * cfg.routed_scaling_factor for wi in w]


def test_dropless_grouped_moe_equals_per_token_reference(cpu_matmul_backend):
    moe = _moe()
    x = torch.randn(2, 9, CFG.hidden_size)
    with torch.no_grad():
        out = moe(x)
        flat = x.reshape(-1, CFG.hidden_size)
        s = torch.sigmoid(flat @ moe.gate.weight.T)
        ref = torch.zeros_like(flat)
        ex = moe.experts
        for n in range(flat.shape[0]):
            idx, w = _reference_route(s[n], moe.gate.bias, CFG)
            for e, we in zip(idx, w):
                h = F.silu(ex.w1[e] @ flat[n]) * (ex.w3[e] @ flat[n])
                ref[n] += we * (ex.w2[e] @ h)
            ref[n] += moe.shared_experts(flat[n][None])[0]
    # outputs reach ~15, where one fp32 ulp is 9.5e-7: allow a few ulps of summation order
    torch.testing.assert_close(out.out.reshape(-1, CFG.hidden_size), ref, rtol=1e-5, atol=4e-6)
    assert out.counts.sum() == flat.shape[0] * CFG.num_experts_per_tok  # dropless


def test_experts_run_only_on_their_own_tokens():
    moe = _moe()
    with torch.no_grad():
        moe.experts.w2[5] = float("nan")  # poison one expert
    x = torch.randn(1, 32, CFG.hidden_size)
    with torch.no_grad():
        out = moe(x)
        idx = moe.gate(x.reshape(-1, CFG.hidden_size)).indices
    chose = (idx == 5).any(-1)
    assert chose.any() and (~chose).any()
    y = out.out.reshape(-1, CFG.hidden_size)
    assert torch.isnan(y[chose]).all(-1).all()
    assert torch.isfinite(y[~chose]).all()


class _ForwardMatmulRows(TorchDispatchMode):
    """Records the rows of every matmul dispatched while active: aten.mm (F.linear and torch.mm), or under
    ``cpu_matmul``'s oneDNN backend oneDNN's linear (the forward's products: rows first)."""

    def __enter__(self):
        self.rows = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.mkldnn._linear_pointwise):
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@DTYPE_MODES
def test_experts_padded_to_a_row_multiple_compute_the_same(monkeypatch, weights, autocast, cpu_matmul_backend):
    """Where oneDNN multiplies on the CPU (bf16; fp32 under the oneDNN backend) an expert's rows beyond
    cpu_matmul.ROW_MULTIPLE are computed zero-padded to a multiple of it (a bounded set of matmul shapes;
    fp32 under MKL is not padded); its outputs and all gradients equal the unpadded computation's, expert
    by expert, bit for bit (the pad rows' outputs are cut off, so their zero output gradients add nothing
    to the weight gradients). Training runs the experts in ``_GroupedSwiGLU`` in every dtype (whole buffers,
    no cat or stack; padded, on windows of the sorted rows): the same products, outputs and gradients as autograd's
    unpadded loop bit for bit, the expert without rows getting zero weight gradients."""
    from dsv3_torch import cpu_matmul
    from dsv3_torch import moe as moe_mod

    m = cpu_matmul.ROW_MULTIPLE
    sizes = [m + 5, 3, 0, 2 * m, 3 * m - 1, m, 1, m + 1]
    low = weights == torch.bfloat16 or autocast
    ex = _experts(sizes, seed=1, dtype=weights)
    x = torch.randn(sum(sizes), CFG.hidden_size, dtype=ex.w1.dtype, requires_grad=True)
    dy = torch.randn(sum(sizes), CFG.hidden_size)

    grouped = moe_mod._GroupedSwiGLU.apply
    used = []
    monkeypatch.setattr(moe_mod._GroupedSwiGLU, "apply", lambda *a: used.append(1) or grouped(*a))
    with _ForwardMatmulRows() as mm, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ex(x, sizes)
    rows = mm.rows
    assert used  # eager training: whole buffers in every dtype
    (y.float() * dy).sum().backward()
    got = [y.detach(), x.grad] + [p.grad for p in ex.parameters()]
    # padded: m + 1, m + 5 -> 2m; 3m - 1 -> 3m; up to m rows as they are
    padded = low or cpu_matmul_backend == "onednn"
    assert sorted(set(rows)) == ([1, 3, m, 2 * m, 3 * m] if padded else sorted(set(sizes) - {0}))

    x.grad = None
    ex.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        w1, w2, w3 = (w.to(torch.bfloat16 if low else weights) for w in (ex.w1, ex.w2, ex.w3))
        ref = _loop_reference(x, sizes, w1, w2, w3)
    (ref.float() * dy).sum().backward()
    want = [ref.detach(), x.grad] + [p.grad for p in ex.parameters()]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@DTYPE_MODES
def test_expert_parallel_experts_compute_like_autograds_loop(weights, autocast, cpu_matmul_backend):
    """An expert-parallel rank's experts (``ExpertParallelExperts``: its local experts, here plain tensors,
    as ``to_local`` gives them) run the same grouped products as the single-device experts, in every dtype
    (under bf16 autocast too, their rows padded where oneDNN multiplies): outputs and gradients equal
    autograd's loop bit for bit."""
    from dsv3_torch import cpu_matmul
    from dsv3_torch.expert_parallel import ExpertParallelExperts
    from dsv3_torch.moe import Experts

    m = cpu_matmul.ROW_MULTIPLE
    sizes = [m + 5, 3, 0, 2 * m, 3 * m - 1, m, 1, m + 1]
    ex = _experts(sizes, seed=6, dtype=weights)
    ex.__class__ = ExpertParallelExperts.subclass_of(Experts)
    x = torch.randn(sum(sizes), CFG.hidden_size, dtype=weights, requires_grad=True)
    dy = torch.randn(sum(sizes), CFG.hidden_size)
    results = []
    for ours in (True, False):
        x.grad = None
        ex.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if ours:
                with _ForwardMatmulRows() as mm:
                    y = ex(x, sizes)
            else:
                y = _loop_reference(x, sizes, *(w.to(torch.bfloat16 if autocast else weights)
                                                for w in (ex.w1, ex.w2, ex.w3)))
        (y.float() * dy).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in ex.parameters()])
    padded = weights == torch.bfloat16 or autocast or cpu_matmul_backend == "onednn"
    assert sorted(set(mm.rows)) == ([1, 3, m, 2 * m, 3 * m] if padded else sorted(set(sizes) - {0}))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@DTYPE_MODES
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_experts_without_gradient_write_the_loops_outputs(context, weights, autocast, cpu_matmul_backend):
    """Without a gradient (inference, prefill, decoding) the experts write each expert's SwiGLU into one
    output buffer (``grouped_swiglu``, no cat), in every dtype: bit for bit autograd's loop over
    ``_swiglu``, the expert without rows included, and nothing recorded for a backward."""
    from dsv3_torch import cpu_matmul

    m = cpu_matmul.ROW_MULTIPLE
    sizes = [7, 0, m + 12, 1, 4, 0, 9, 2 * m + 3]
    ex = _experts(sizes, seed=4, dtype=weights)
    x = torch.randn(sum(sizes), CFG.hidden_size, dtype=weights)
    with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ex(x, sizes)
        w1, w2, w3 = (w.to(torch.bfloat16 if autocast else weights) for w in (ex.w1, ex.w2, ex.w3))
        ref = _loop_reference(x, sizes, w1, w2, w3)
    assert y.grad_fn is None and not y.requires_grad
    assert y.dtype == ref.dtype == (torch.bfloat16 if autocast else weights)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_grouped_swiglu_gives_only_the_gradients_asked_for(cpu_matmul_backend):
    """_GroupedSwiGLU with frozen weights or a constant input: the other side's gradients equal autograd's
    loop bit for bit, and none is made for what needs none."""
    sizes = [5, 0, 9, 2, 0, 4, 1, 3]
    ex = _experts(sizes, seed=3)
    x0, dy = torch.randn(sum(sizes), CFG.hidden_size), torch.randn(sum(sizes), CFG.hidden_size)
    for frozen in (True, False):
        x = x0.clone().requires_grad_(frozen)
        ex.requires_grad_(not frozen)
        ex.zero_grad(set_to_none=True)
        (ex(x, sizes) * dy).sum().backward()
        got = [x.grad] + [p.grad for p in ex.parameters()]
        x.grad = None
        ex.zero_grad(set_to_none=True)
        ref = _loop_reference(x, sizes, ex.w1, ex.w2, ex.w3)
        (ref * dy).sum().backward()
        want = [x.grad] + [p.grad for p in ex.parameters()]
        assert [g is None for g in got] == [g is None for g in want] == [not frozen] + [frozen] * 3
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch_sorts_pairs_by_expert():
    idx = torch.tensor([[0, 3], [1, 3], [0, 2]])
    d = sort_by_expert(idx, 4)
    flat = idx.t().reshape(-1)
    assert torch.equal(flat[d.order], torch.tensor([0, 0, 1, 2, 3, 3]))
    assert torch.equal(d.tokens, torch.tensor([0, 2, 1, 2, 0, 1]))
    assert d.counts.tolist() == [2, 1, 1, 2]


def test_bias_selects_but_weights_stay_unbiased():
    router = _moe().gate
    with torch.no_grad():
        router.bias.zero_()
    x = torch.randn(64, CFG.hidden_size)
    with torch.no_grad():
        plain = router(x)
        router.bias[7] = 10.0  # expert 7 now always wins selection
        biased = router(x)
    assert not (plain.indices == 7).any(-1).all()
    assert (biased.indices == 7).any(-1).all()
    s = torch.sigmoid(x @ router.weight.T)
    assert torch.equal(biased.scores, plain.scores)
    want = s.gather(1, biased.indices)
    want = want / (want.sum(-1, keepdim=True) + 1e-20) * CFG.routed_scaling_factor
    torch.testing.assert_close(biased.weights, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(biased.weights.sum(-1), torch.full((64,), CFG.routed_scaling_factor))


def test_selected_experts_never_leave_the_top_groups():
    router = _moe().gate
    x = torch.randn(256, CFG.hidden_size)
    per = CFG.n_routed_experts // CFG.n_group
    with torch.no_grad():
        r = router(x)
        sel = r.scores + router.bias
        gscore = sel.view(-1, CFG.n_group, per).topk(2, -1).values.sum(-1)
        top_groups = gscore.topk(CFG.topk_group, -1).indices
        unlimited = sel.topk(CFG.num_experts_per_tok, -1).indices
    in_top = lambda idx: (idx[:, :, None] // per == top_groups[:, None, :]).any(-1)
    assert in_top(r.indices).all()
    assert not in_top(unlimited).all()  # the limit actually changed some selections
    assert (r.indices.diff(dim=-1) > 0).all()  # fixed ascending slot order


@pytest.mark.parametrize("per", [2, 4, 32])
def test_group_score_is_topk_two_summed_bit_for_bit(per):
    """The router's group score (two max reductions) equals ``topk(2).values.sum(-1)`` exactly, with
    tied maxima (which count twice, as in topk) and -inf entries (a group's masked experts)."""
    from dsv3_torch.moe import _top2_sum

    torch.manual_seed(per)
    v = torch.rand(300, 8, per)
    tied = (torch.rand(300, 8, per) * 3).round()  # many rows with a repeated maximum
    tied[0, 0] = float("-inf")
    tied[1, 0, 1:] = float("-inf")
    for t in (v, tied):
        assert torch.equal(_top2_sum(t), t.topk(2, dim=-1).values.sum(-1))
    assert (tied.amax(-1) == tied.topk(2, dim=-1).values[..., 1]).any()  # ties present


def test_forward_reports_counts_and_never_changes_the_bias():
    m = dsv3_torch.DeepSeekV3(CFG)
    before = [r.bias.clone() for r in m.routers()]
    x = torch.randint(0, CFG.vocab_size, (2, 10))
    out = m.compute_loss(x, x.roll(-1, 1))
    out.loss.backward()
    assert out.counts.shape == (CFG.n_router_layers, CFG.n_routed_experts)
    assert (out.counts.sum(-1) == 2 * 10 * CFG.num_experts_per_tok).all()
    assert all(torch.equal(b, r.bias) for b, r in zip(before, m.routers()))
    assert all(r.bias.grad is None and not r.bias.requires_grad for r in m.routers())
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in m.routers())
    assert "layers.1.ffn.gate.bias" in dict(m.named_buffers())
    assert "layers.1.ffn.gate.bias" not in dict(m.named_parameters())


def test_eager_and_grouped_combine_agree_in_fp32():
    moe = _moe()
    x = torch.randn(2, 11, CFG.hidden_size)
    with torch.no_grad():
        grouped = moe(x).out
        moe.dispatcher.scheme = "eager"
        eager = moe(x).out
        moe.dispatcher.scheme = "bogus"
        with pytest.raises(ValueError, match="combine"):
            moe(x)
    torch.testing.assert_close(eager, grouped, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="combine scheme"):
        dsv3_torch.DeepSeekV3(CFG).set_moe_combine("fast")


# ------------------------------------------------------------ balance loss
def test_balance_loss_of_uniform_routing_is_exactly_one():
    s = torch.full((3, 10, 16), 0.5)
    assert sequence_balance_loss(s, 4).item() == 1.0
    # every expert chosen equally often, scores uniform after normalisation
    E, K, T = 8, 2, 4
    s = torch.full((1, T, E), 0.25)
    for t in range(T):
        s[0, t, 2 * t: 2 * t + 2] = 0.2500001  # token t picks experts 2t, 2t+1
    assert sequence_balance_loss(s, K).item() == pytest.approx(1.0, abs=1e-6)


def test_model_balance_loss_with_uniform_routers_is_alpha_per_router():
    cfg = CFG.replace(balance_loss_alpha=3e-4)
    m = dsv3_torch.DeepSeekV3(cfg)
    with torch.no_grad():
        for r in m.routers():
            r.weight.zero_()  # every score sigmoid(0) = 0.5
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    out = m.compute_loss(x, x)
    assert out.balance_loss.item() == pytest.approx(cfg.balance_loss_alpha * cfg.n_router_layers, rel=1e-6)


def test_balance_loss_matches_definition_and_gradient_flows_only_through_p():
    B, T, E, K = 2, 5, 8, 3
    s = torch.rand(B, T, E, dtype=torch.float64, requires_grad=True)
    loss = sequence_balance_loss(s, K)
    want = 0.0
    for b in range(B):
        hits = torch.zeros(E, dtype=torch.float64)
        for t in range(T):
            hits[s[b, t].topk(K).indices] += 1
        f = E / (K * T) * hits
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        want = want + (f * p).sum() / B
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    (g,) = torch.autograd.grad(loss, s)
    # finite differences with f held fixed: a tiny step does not change any top-K
    eps, i = 1e-7, (1, 2, 4)
    s2 = s.detach().clone()
    s2[i] += eps
    fd = (sequence_balance_loss(s2, K) - loss.detach()) / eps
    assert g[i].item() == pytest.approx(fd.item(), rel=1e-5)


def test_update_router_bias_moves_overloaded_down_and_underloaded_up():
    cfg = CFG.replace(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)
    m = dsv3_torch.DeepSeekV3(cfg)
    n = cfg.n_router_layers
    counts = torch.tensor([[10, 2, 4, 4]] * n)  # mean 5
    counts[-1] = torch.tensor([5, 5, 9, 1])       # the MTP router (last) gets its own row
    m.update_router_bias(counts, gamma=0.01)
    biases = torch.stack([r.bias for r in m.routers()])
    assert torch.equal(biases[0], torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert torch.equal(biases[-1], torch.tensor([0.0, 0.0, -0.01, 0.01]))
    m.update_router_bias(counts)  # default gamma = cfg.bias_update_speed
    assert biases[0, 0].item() - m.routers()[0].bias[0].item() == pytest.approx(cfg.bias_update_speed)
    with pytest.raises(ValueError, match="counts must be"):
        m.update_router_bias(counts[:1])


def test_router_is_fp32_in_a_bf16_model():
    m = dsv3_torch.DeepSeekV3(CFG, dtype=torch.bfloat16)
    r = m.routers()[0]
    assert r.weight.dtype == r.bias.dtype == torch.float32
    out = m.layers[1].ffn(torch.randn(1, 4, CFG.hidden_size, dtype=torch.bfloat16))
    assert out.out.dtype == torch.bfloat16 and out.scores.dtype == torch.float32


def test_compiled_bf16_experts_multiply_padded_rows():
    """Under torch.compile the row counts are symbols, and oneDNN builds a bf16 kernel for each new one
    (~2 ms a call on a 2-core VM, where the steady product takes ~0.03): in a compiled graph every
    expert's bf16 rows are zero-padded to a multiple of cpu_matmul.ROW_MULTIPLE, with no recompile for
    new counts, and outputs and gradients equal eager's bit for bit (``aot_eager``: the graph's own ATen
    ops, without Inductor's fusions)."""
    from torch.profiler import ProfilerActivity, profile

    from dsv3_torch import cpu_matmul
    from dsv3_torch.moe import group_sizes

    m = cpu_matmul.ROW_MULTIPLE
    ex = _experts([0] * 8, seed=5)
    step = torch.compile(lambda x, counts: ex(x, group_sizes(counts, x.shape[0])), backend="aot_eager",
                         fullgraph=True)
    rows, results, graphs = set(), {}, []
    # two routings of the same rows (M = N·K is fixed in the model)
    for sizes in ([m + 3, 5, 0, 2 * m - 1, 1, 0, 7, m], [1, m + 9, m, 1, 0, 2, 2 * m + 1, 1]):
        x0 = torch.randn(sum(sizes), CFG.hidden_size)
        counts = torch.tensor(sizes)
        for compiled in (True, False):
            x = x0.clone().requires_grad_()
            ex.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, \
                    torch._dynamo.config.patch(capture_scalar_outputs=True), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                y = step(x, counts) if compiled else ex(x, sizes)
            (y.float() ** 2).sum().backward()
            results[compiled] = [y.detach(), x.grad] + [p.grad for p in ex.parameters()]
            if compiled:  # the graphs compiled so far; the products' row counts, where the profiler recorded them
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                rows |= {e.input_shapes[0][0] for e in prof.key_averages(group_by_input_shape=True)
                         if e.key == "aten::mm" and e.input_shapes and e.input_shapes[0]}
        for a, b in zip(results[True], results[False]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {m, 2 * m, 3 * m} <= rows and all(r % m == 0 for r in rows), rows  # 5, 1, 7 rows: padded to m
    assert graphs[1] == graphs[0], graphs  # the second sizes: no recompile
