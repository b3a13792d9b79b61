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
TINY = ModelConfig.preset("tiny").replace(vocab_size=256, bias_update_speed=1e-2)


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
        pytest.importorskip("dsv3_jax.train")
        from dsv3_jax.train import make_backend
    else:
        from dsv3_torch.train import make_backend
    return make_backend


def _tcfg(config_dir, framework, **kw):
    # Every test uses micro-batches of 2 x 32 tokens and the same optimizer hyper-parameters, so the JAX
    # tests share compiled steps. Adam divides by |g| + eps: where a gradient is ~1e-8, fp32 summation order
    # (4 partial sums vs one) would move an update by O(lr); eps=1e-3 keeps the accumulation test a test
    # of accumulation, not of that rounding.
    base = dict(framework=framework, config=config_dir, steps=6, batch_size=8, grad_accum=4, seq_len=32, lr=3e-3,
                warmup_steps=2, eps=1e-3, eval_every=3, eval_batches=2, save_every=3, progress=False, plots=False,
                out="unused")
    base.update(kw)
    return TrainConfig(**base)


def _biases(state):
    return {k: v for k, v in state.items() if k.endswith("gate.bias")}


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
    pytest.importorskip("dsv3_jax.train")
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


def test_torch_compile_trains_like_eager_without_recompiling_every_step():
    """compile=True: the same losses as eager, and the graphs stop changing after the second step
    (automatic dynamic shapes absorb the per-expert row counts, which change every step).

    Compilation is the whole cost, and each MoE block adds its own graphs (the per-expert row
    counts end a graph), so the model is the tiny preset cut to two layers: one dense layer, one
    MoE layer and the MoE block of the MTP depth, i.e. every kind of block and two routers."""
    import torch._dynamo.utils

    from dsv3.bench import random_state

    make_backend = _backend("torch")
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
    assert cfg.first_k_dense_replace == 1 and cfg.n_moe_layers == 1 and cfg.num_nextn_predict_layers == 1
    state = random_state(cfg, 0)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 33)).astype(np.int32)
    batches = [[(t[:, :-1], t[:, 1:])] for t in (np.roll(tokens, i, axis=1) for i in range(4))]
    losses, graphs = {}, []
    for compile_ in (False, True):
        b = make_backend(cfg, TrainConfig(framework="torch", batch_size=4, seq_len=32, progress=False,
                                          plots=False, compile=compile_))
        b.load_canonical_state(state)
        losses[compile_] = []
        for batch in batches:
            losses[compile_].append(b.train_step(batch, 1e-3)["loss"])
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert graphs[5] > graphs[3] and graphs[7] == graphs[5], graphs  # compiled, then no new graphs
