"""The training backends (dsv3_torch.train, dsv3_jax.train) on the tiny preset (byte vocabulary):
gradient accumulation, the once-per-step bias update, eval without side effects, resume exactness."""

import os

import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3.data import BatchSampler, load_corpus
from dsv3.rundir import latest_checkpoint, load_train_state, read_metrics
from dsv3.train_config import TrainConfig, lr_at, model_config
from dsv3.training import train

FRAMEWORKS = ["torch", "jax"]
# The tiny preset cut to two layers: one dense layer, one MoE layer and the MTP depth's MoE block, i.e. every
# kind of block and two routers (the layers are unrolled in the JAX graph: compilation is most of the cost).
TINY = ModelConfig.preset("tiny").replace(vocab_size=256, bias_update_speed=1e-2, num_hidden_layers=2)
assert TINY.first_k_dense_replace == 1 and TINY.n_moe_layers == 1 and TINY.n_router_layers == 2
# bf16 (fp32 master weights) vs fp32 losses, max relative difference per step over 6 steps, measured:
# torch 1.9e-4, JAX 1.7e-4 on the 3-layer preset; over 4 steps on the 2-layer TINY below: torch 7.5e-5,
# JAX 1.9e-4 (fp32 loss reductions over a bf16 forward)
BF16_LOSS_RTOL = 3e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny256")
    TINY.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=300_000)


def _backend(framework):
    if framework == "jax":
        from dsv3_jax.train import make_backend
    else:
        from dsv3_torch.train import make_backend
    return make_backend


def _tcfg(config_dir, framework, **kw):
    # Every test uses micro-batches of 2 x 32 tokens (or one of 8 x 32) and the same betas and clipping, so
    # the JAX tests share compiled steps (eps and the decay rate are arguments of the compiled step). Adam divides by |g| + eps: where a gradient is ~1e-8, fp32 summation order
    # (4 partial sums vs one) would move an update by O(lr); eps=1e-3 keeps the accumulation test a test
    # of accumulation, not of that rounding.
    base = dict(framework=framework, config=config_dir, steps=6, batch_size=8, grad_accum=4, seq_len=32, lr=3e-3,
                warmup_steps=2, eps=1e-3, eval_every=3, eval_batches=2, save_every=3, progress=False, plots=False,
                out="unused")
    base.update(kw)
    return TrainConfig(**base)


def _biases(state):
    return {k: v for k, v in state.items() if k.endswith("gate.bias")}


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_grad_accumulation_equals_big_batch(framework, config_dir, corpus):
    make = _backend(framework)
    sampler = BatchSampler(corpus.train, 32, seed=0)
    results = {}
    for k in (1, 4):
        t = _tcfg(config_dir, framework, batch_size=8, grad_accum=k)
        b = make(model_config(t), t)
        losses, counts = [], []
        for step in range(2):
            mb = t.micro_batch_size
            micro = [sampler.batch(step * 8 + j * mb, mb) for j in range(k)]
            out = b.train_step(micro, lr_at(step, t))
            losses.append(out["loss"])
            counts.append(np.asarray(out["counts"]))
        results[k] = (losses, counts, b.canonical_state())
    (l1, c1, s1), (l4, c4, s4) = results[1], results[4]
    np.testing.assert_allclose(l4, l1, rtol=2e-6)
    for a, b_ in zip(c1, c4):
        assert np.array_equal(a, b_)  # counts summed over the 4 micro-batches
        assert a.sum() == 8 * 32 * TINY.num_experts_per_tok * TINY.n_router_layers
    bias1, bias4 = _biases(s1), _biases(s4)
    assert any(np.abs(v).max() > 0 for v in bias1.values())
    for k in bias1:  # one bias update per step from the summed counts: identical
        np.testing.assert_array_equal(bias4[k], bias1[k])
    for k in s1:
        np.testing.assert_allclose(s4[k], s1[k], rtol=1e-6, atol=1e-8, err_msg=k)  # fp32 rounding only


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_grad_accumulation_with_the_default_adam_eps(framework, config_dir, corpus):
    """The default eps=1e-8: accumulation is exact wherever Adam's update is not rounding-bound.

    Why eps=1e-8 is not compared like eps=1e-3 above: the tiny model has many gradient entries near
    eps (about a quarter of all entries are below 1e-5; the MTP attention projections' largest is
    ~3e-6); none is exactly 0 (measured in torch), so this is rounding, not a dead expert. Adam's first update is lr * g / (|g| + eps); where |g| <~ eps it is
    ~lr * g / eps, which multiplies the ~1e-12 absolute rounding difference between one fp32 sum and
    four partial sums by 1/eps = 1e8 (measured: weights then differ by up to 2e-6, vs atol 1e-8).
    So, one step without weight decay (the update is then exactly -lr * g / (|g| + eps)):

    - entries the big-batch step moved by more than 0.999 lr (|g| > ~1000 eps, ~3/4 of all entries):
      the same fp32 tolerance as with eps=1e-3 (measured on the 2-layer TINY, JAX: 69% of all entries);
    - every entry: |dw| <= 3e-2 lr (measured worst on the 3-layer preset: torch 1.5e-3 lr, JAX 4.3e-3 lr;
      on the 2-layer TINY, JAX: 6.9e-4 lr);
    - losses, counts and router biases as above.
    """
    make = _backend(framework)
    sampler = BatchSampler(corpus.train, 32, seed=0)
    runs = {}
    for k in (1, 4):
        t = _tcfg(config_dir, framework, batch_size=8, grad_accum=k, eps=1e-8, weight_decay=0.0)
        assert t.eps == TrainConfig().eps  # the default
        b = make(model_config(t), t)
        before = b.canonical_state()
        lr = lr_at(0, t)
        micro = [sampler.batch(j * t.micro_batch_size, t.micro_batch_size) for j in range(k)]
        out = b.train_step(micro, lr)
        runs[k] = (before, out, b.canonical_state())
    (w0, o1, s1), (w0_4, o4, s4) = runs[1], runs[4]
    np.testing.assert_allclose(o4["loss"], o1["loss"], rtol=2e-6)
    assert np.array_equal(np.asarray(o4["counts"]), np.asarray(o1["counts"]))
    n_clear = n_all = 0
    for name in s1:
        np.testing.assert_array_equal(w0_4[name], w0[name], err_msg=name)  # the same start
        if name.endswith("gate.bias"):
            np.testing.assert_array_equal(s4[name], s1[name], err_msg=name)
            continue
        moved = np.abs(s1[name] - w0[name]) / lr  # |g| / (|g| + eps) up to the weight's rounding
        clear = moved > 0.999
        n_clear, n_all = n_clear + int(clear.sum()), n_all + clear.size
        np.testing.assert_allclose(s4[name][clear], s1[name][clear], rtol=1e-6, atol=1e-8, err_msg=name)
        assert np.abs(s4[name] - s1[name]).max() <= 3e-2 * lr, name
    assert n_clear > 0.6 * n_all, (n_clear, n_all)  # most entries compared at the fp32 tolerance


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bias_update_once_per_step_from_summed_counts_and_never_in_eval(framework, config_dir, corpus):
    make = _backend(framework)
    t = _tcfg(config_dir, framework)
    b = make(model_config(t), t)
    sampler = BatchSampler(corpus.train, 32, seed=1)
    before = b.canonical_state()
    assert all(np.all(v == 0) for v in _biases(before).values())
    x, y = sampler.batch(0, 2)
    ev = b.eval_step(x, y)
    assert np.isfinite(ev["main_loss"]) and "mtp_depth_loss" in ev
    after_eval = b.canonical_state()
    for k in before:  # evaluation changes nothing
        np.testing.assert_array_equal(after_eval[k], before[k], err_msg=k)
    micro = [sampler.batch(2 * j, 2) for j in range(4)]
    out = b.train_step(micro, 1e-3)
    c = np.asarray(out["counts"], np.float64)
    per_micro = c.sum() / 4
    assert per_micro == 2 * 32 * TINY.num_experts_per_tok * TINY.n_router_layers  # all 4 micro-batches counted
    expect = TINY.bias_update_speed * np.sign(c.mean(-1, keepdims=True) - c)
    got = np.stack([v for _, v in sorted(_biases(b.canonical_state()).items(),
                                         key=lambda kv: (kv[0].startswith("mtp"), kv[0]))])
    np.testing.assert_allclose(got, expect.astype(np.float32), rtol=0, atol=0)  # ONE update, summed counts


def test_weight_decay_masks_skip_norms_and_bias(config_dir):
    """Both optimizers decay exactly the canonical matrices, never a norm weight or the router bias."""
    from dsv3.names import canonical_shapes
    from dsv3.train_config import decays

    want = {n for n, s in canonical_shapes(TINY).items() if decays(n, len(s))}
    assert want and not any("norm" in n or n.endswith("bias") for n in want)
    from dsv3_torch.train import make_backend as make_torch

    t = _tcfg(config_dir, "torch", weight_decay=0.1)
    tb = make_torch(model_config(t), t)
    decayed = {tb.names[p] for g in tb.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == want
    assert all(g["weight_decay"] == 0.0 for g in tb.optimizer.param_groups if not {tb.names[p] for p in g["params"]} & want)
    from flax import nnx

    from dsv3_jax.train import decay_mask
    from dsv3_jax.model import DeepSeekV3

    m = nnx.eval_shape(lambda: DeepSeekV3(TINY, rngs=nnx.Rngs(0)))
    mask = {".".join(map(str, p)): bool(v.get_value()) for p, v in nnx.to_flat_state(decay_mask(nnx.state(m, nnx.Param)))}
    jax_to_canon = {n: v for n, v in mask.items()}
    n_decayed = sum(jax_to_canon.values())
    assert n_decayed == len(want)
    for name, dec in mask.items():
        assert dec == (not name.endswith("norm.weight")), name
    assert not any("bias" in n for n in mask)  # the RouterBias is not an nnx.Param at all


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_is_exact(framework, config_dir, corpus, tmp_path):
    make = _backend(framework)
    full = _tcfg(config_dir, framework, out=str(tmp_path / "full"))
    train(full, make, corpus=corpus, quiet=True)
    part = _tcfg(config_dir, framework, out=str(tmp_path / "part"), steps=3)
    train(part, make, corpus=corpus, quiet=True)  # "killed" after its step-3 checkpoint
    resumed = _tcfg(config_dir, framework, out=str(tmp_path / "part"))
    train(resumed, make, resume=True, corpus=corpus, quiet=True)
    keys = ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm", "counts", "val_loss", "val_mtp_loss")
    pick = lambda rs: [{k: r[k] for k in keys if k in r} | {"step": r["step"]} for r in rs]
    a = pick(read_metrics(str(tmp_path / "full" / "metrics.jsonl")))
    b = pick(read_metrics(str(tmp_path / "part" / "metrics.jsonl")))
    assert a == b  # bit-identical losses, gradient norms, counts and validation after resuming
    _, meta = load_train_state(latest_checkpoint(str(tmp_path / "part")))
    assert meta["step"] == 6 and meta["samples_seen"] == 48
    from dsv3.checkpoint import load_canonical

    _, sa = load_canonical(latest_checkpoint(str(tmp_path / "full")))
    _, sb = load_canonical(latest_checkpoint(str(tmp_path / "part")))
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bf16_training_resumes_exactly_and_tracks_fp32(framework, config_dir, corpus, tmp_path, capsys):
    """--dtype bfloat16: 4 steps straight vs 2 steps, "killed", resumed to 4: bit-identical metrics and
    weights; every loss finite, computed in bf16 (not equal to fp32's) and within BF16_LOSS_RTOL of the
    same run in fp32."""
    make = _backend(framework)

    def run(name, dtype, steps, resume=False):
        t = _tcfg(config_dir, framework, out=str(tmp_path / name), dtype=dtype, steps=steps, save_every=2,
                  eval_every=2, eval_batches=1)
        train(t, make, resume=resume, corpus=corpus, quiet=True)
        return read_metrics(str(tmp_path / name / "metrics.jsonl"))

    full = run("full", "bfloat16", 4)
    run("part", "bfloat16", 2)
    part = run("part", "bfloat16", 4, resume=True)
    f32 = run("f32", "float32", 4)
    keys = ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm", "counts", "val_loss", "val_mtp_loss")
    pick = lambda rs: [{k: r[k] for k in keys if k in r} | {"step": r["step"], "kind": r["kind"]} for r in rs]
    assert pick(full) == pick(part)  # bit-identical after resuming
    from dsv3.checkpoint import load_canonical

    _, sa = load_canonical(latest_checkpoint(str(tmp_path / "full")))
    _, sb = load_canonical(latest_checkpoint(str(tmp_path / "part")))
    for k in sa:
        assert sa[k].dtype == np.float32, k  # fp32 master weights
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    rows = [(a, b) for a, b in zip(pick(full), pick(f32))]
    assert [a["step"] for a, _ in rows] == [b["step"] for _, b in rows] and len(rows) == len(f32)
    worst = {}
    for a, b in rows:
        for k in ("loss", "main_loss", "mtp_loss", "val_loss", "val_mtp_loss"):
            if k in a:
                assert np.isfinite(a[k]), (a["step"], k, a[k])
                worst[k] = max(worst.get(k, 0.0), abs(a[k] - b[k]) / abs(b[k]))
    with capsys.disabled():
        print(f"\n{framework} bf16 vs fp32, max relative difference over 4 steps: "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert {"loss", "main_loss", "val_loss"} <= set(worst)
    assert max(worst.values()) > 1e-6  # bf16 really was used
    for k, v in worst.items():
        assert v <= BF16_LOSS_RTOL, (k, v)


def test_torch_bf16_autocast_keeps_fp32_master_weights(config_dir, corpus):
    """--dtype bfloat16: compute under bf16 autocast, fp32 weights and Adam state; losses near fp32's."""
    from dsv3_torch.train import TorchBackend

    sampler = BatchSampler(corpus.train, 32, seed=2)
    micro = [sampler.batch(2 * j, 2) for j in range(4)]
    f32 = TorchBackend(TINY, _tcfg(config_dir, "torch"))
    b16 = TorchBackend(TINY, _tcfg(config_dir, "torch", dtype="bfloat16"))
    b16.load_canonical_state(f32.canonical_state())
    a, b = f32.train_step(micro, 1e-3), b16.train_step(micro, 1e-3)
    assert abs(b["main_loss"] - a["main_loss"]) / a["main_loss"] < 2e-2
    assert all(p.dtype.is_floating_point and str(p.dtype) == "torch.float32" for p in b16.model.parameters())
    assert all(v.dtype == np.float32 for v in b16.optimizer_state().values() if v.ndim)


def test_torch_sum_of_squares_matches_fp64():
    """The gradient norm's sum of squares (chunked dot products, no squared temporary) against fp64,
    on tensors shorter than a chunk, a whole number of chunks and more, a bf16 one and none."""
    import torch

    from dsv3_torch.train import _NORM_CHUNK, sum_of_squares

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in ((3,), (7, 5), (2, _NORM_CHUNK), (_NORM_CHUNK + 13,), (300, 700))]
    ts.append(torch.randn(1000, generator=g).to(torch.bfloat16))
    got = sum_of_squares(ts)
    ref = sum(float((t.double() ** 2).sum()) for t in ts)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(float(got) / ref - 1) < 1e-6
    assert float(sum_of_squares(ts[:1])) == float((ts[0] ** 2).sum())  # 3 values: exact either way
    assert float(sum_of_squares([])) == 0.0


@pytest.mark.parametrize("clip", [2.0 ** -6, 0.0])
def test_torch_clipping_in_the_adamw_pass_equals_clipping_the_gradients(config_dir, corpus, clip):
    """The clipped step (AdamW dividing each gradient by norm / grad_clip in its fused pass) gives the
    weights, moments and clipped gradients of the explicit g / norm * grad_clip before an unscaled step:
    bit for bit at a power-of-two grad_clip (the clip below is far under the norm); grad_clip 0 does not
    clip."""
    import math

    import torch

    from dsv3_torch.train import TorchBackend, sum_of_squares

    sampler = BatchSampler(corpus.train, 32, seed=3)
    micro = [sampler.batch(2 * j, 2) for j in range(2)]
    t = _tcfg(config_dir, "torch", grad_clip=clip)
    fused, explicit = TorchBackend(TINY, t), TorchBackend(TINY, t)
    explicit.load_canonical_state(fused.canonical_state())

    @torch.no_grad()
    def clip_explicitly():
        grads = [p.grad for p in explicit.model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum_of_squares(grads))
        if clip > 0 and math.isfinite(float(norm)) and float(norm) >= clip:
            for g in grads:
                g.div_(norm).mul_(clip)
        explicit.optimizer.grad_scale = None
        return float(norm)

    explicit._clip = clip_explicitly
    for step in range(2):
        a, b = fused.train_step(micro, 1e-3), explicit.train_step(micro, 1e-3)
        assert a["grad_norm"] == b["grad_norm"] > 100 * 2.0 ** -6
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(fused.model.parameters(), explicit.model.parameters()))
    sa, sb = fused.canonical_state(), explicit.canonical_state()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    oa, ob = fused.optimizer_state(), explicit.optimizer_state()
    assert all(np.array_equal(oa[k], ob[k]) for k in oa)


@pytest.mark.slow
def test_torch_compile_trains_like_eager_in_one_graph_compiled_once(monkeypatch):
    """compile=True: the same losses as eager, the loss (forward and backward, MoE and MTP blocks
    included) one graph without a graph break, and no recompile on later steps although the
    per-expert row counts change every step (they are data-dependent symbols in the graph:
    ``dsv3_torch.train.compile_loss``, ``dsv3_torch.moe.group_sizes``). The compiled run starts with the
    fp32 matmul library unresolved, as a ``dsv3 train --compile`` process does (resolving it reads
    /proc/cpuinfo, which Dynamo cannot trace).

    Compilation is the whole cost, so the model is the tiny preset cut to one layer: a dense layer
    and the MoE block of the MTP depth, i.e. both kinds of block and a router; and 4 routed experts
    (2 groups, top-1 group, top-2 experts: still group-limited routing) instead of 8: the graph
    unrolls one matmul chain per expert.

    Inductor's C++ code generation is set for compile time, none of which changes the graph Dynamo
    captures, its guards or what a recompile would be (the subject here):
      - compile_threads=1: g++ runs from this process rather than from a pool of worker processes
        that each import torch first;
      - cpp_wrapper: the graph's kernels and its wrapper are one C++ file, one g++ run per graph,
        instead of one per kernel (about 60 here, each ~1 s of g++, mostly parsing ATen's headers);
      - cpp.simdlen=0: scalar loops, without Inductor's vectorisation analysis and ATen's vector headers.
    Measured on 2 cores, compiling this model: 109 s with Inductor's defaults, 63-79 s with
    cpp_wrapper, 53 s with both. The default code generation (vectorised kernels, Python wrapper) is
    what ``dsv3 bench`` runs and times for its torch.compile rows."""
    import torch._dynamo.utils
    import torch._inductor.config

    from dsv3.bench import random_state
    from dsv3_torch import cpu_matmul

    make_backend = _backend("torch")
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=1, n_routed_experts=4, n_group=2, topk_group=1,
                                             num_experts_per_tok=2)
    assert cfg.first_k_dense_replace == 1 and cfg.n_router_layers == 1 and cfg.num_nextn_predict_layers == 1
    state = random_state(cfg, 0)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 33)).astype(np.int32)
    batches = [[(t[:, :-1], t[:, 1:])] for t in (np.roll(tokens, i, axis=1) for i in range(4))]
    counters = torch._dynamo.utils.counters
    losses, graphs, breaks = {}, [], []
    for compile_ in (False, True):
        if compile_:
            monkeypatch.setattr(cpu_matmul, "_backend", None)
        b = make_backend(cfg, TrainConfig(framework="torch", batch_size=4, seq_len=32, progress=False,
                                          plots=False, compile=compile_))
        b.load_canonical_state(state)
        losses[compile_] = []
        with torch._inductor.config.patch({"compile_threads": 1, "cpp_wrapper": True, "cpp.simdlen": 0}):
            for batch in batches:
                losses[compile_].append(b.train_step(batch, 1e-3)["loss"])
                graphs.append(counters["stats"]["unique_graphs"])
                breaks.append(sum(counters["graph_break"].values()))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert graphs[4] == graphs[3] + 1 and graphs[7] == graphs[4], graphs  # one graph, compiled once
    assert breaks[7] == breaks[3], dict(counters["graph_break"])
