"""Whole model, torch vs jax: logits, loss terms, router counts, gradients of every parameter, one
AdamW step + the bias update, greedy decoding — fp32 and bf16, weights born in either framework."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import dsv3_jax
import dsv3_torch
from dsv3.config import ModelConfig
from dsv3.train_config import decays
from dsv3_torch.train import adamw
from parity_util import GRAD_TOL, TOL, assert_close, kl, make_pair, np32, record

# The tiny preset cut to two layers: a dense layer, a MoE layer and the MTP depth's MoE block (every kind of
# block, two routers); the JAX programs these tests compile are a third smaller than with the preset's 3 layers.
TINY = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
# |d| / |ref| of the balance loss, ~20x the worst measured over the four weight pairs: fp32 1.7e-7, bf16 8.7e-6
BALANCE_TOL = {"float32": 3e-6, "bfloat16": 2e-4}


def batch(cfg, B=2, T=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    labels[0, 3] = -100  # an ignored position inside the window
    return ids, labels


_loss = nnx.jit(lambda m, a, b: m.compute_loss(a, b))


def compare_forward(tm, jm, cfg, dtype, tag="", seed=0):
    ids, labels = batch(cfg, seed=seed)
    with torch.no_grad():
        lt = tm(torch.as_tensor(ids))
        out_t = tm.compute_loss(torch.as_tensor(ids), torch.as_tensor(labels))
    lj = jm(jnp.asarray(ids, jnp.int32))
    out_j = _loss(jm, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32))
    # routing first: identical integer counts per router
    np.testing.assert_array_equal(np.asarray(out_j.counts), out_t.counts.numpy(), err_msg="router counts")
    record("router counts (exact)" + tag, dtype, 0.0, 0.0, "exact")
    assert_close("model logits" + tag, dtype, lj, lt)
    if dtype == "bfloat16":
        k = kl(lt, lj)
        record("model logits KL" + tag, dtype, k, 1e-3, "KL(torch||jax)")
        assert k < 1e-3
    for name in ("loss", "main_loss", "mtp_loss"):
        assert_close(f"loss: {name}" + tag, dtype, getattr(out_j, name), getattr(out_t, name), TOL[dtype])
    # The balance loss is ~3e-4 (alpha * sum f_i P_i): TOL's max(1, |ref|) scale would allow ~65x its value
    # in bf16, so it is compared relative to itself.
    bt, bj = float(np32(out_t.balance_loss)), float(np32(out_j.balance_loss))
    assert bt > 0, bt
    rel = abs(bj - bt) / abs(bt)
    record("loss: balance_loss" + tag, dtype, rel, BALANCE_TOL[dtype], "|d|/|ref|")
    assert rel <= BALANCE_TOL[dtype], f"balance loss [{dtype}]: {bj!r} vs {bt!r}, relative error {rel:.3e}"
    if cfg.num_nextn_predict_layers:
        assert_close("loss: mtp_losses" + tag, dtype, out_j.mtp_losses, out_t.mtp_losses, TOL[dtype])


@pytest.mark.parametrize("dtype,born", [("float32", "torch"), ("float32", "jax"), ("bfloat16", "torch"),
                                        ("bfloat16", "jax")])
def test_logits_loss_counts(dtype, born):
    tm, jm = make_pair(TINY, dtype, born, seed=11)
    compare_forward(tm, jm, TINY, dtype)


_loss_masked = nnx.jit(lambda m, a, b, am: m.compute_loss(a, b, am))
_logits_masked = nnx.jit(lambda m, a, am: m.logits(a, am))


def padded_batch(cfg, seed=0):
    """ids [2, 12], labels, attention_mask: row 0 LEFT-padded by 4, row 1 RIGHT-padded by 3 (pad id 7,
    labels at padded positions NOT -100: the mask alone must drop them)."""
    ids, labels = batch(cfg, seed=seed)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[1, -3:] = 0
    ids = np.where(mask == 1, ids, 7)
    return ids, labels, mask


@pytest.mark.parametrize("dtype,born", [("float32", "torch"), ("float32", "jax"), ("bfloat16", "torch")])
def test_logits_loss_counts_with_attention_mask(dtype, born):
    tm, jm = make_pair(TINY, dtype, born, seed=16)
    ids, labels, mask = padded_batch(TINY, seed=4)
    with torch.no_grad():
        lt = tm(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
        out_t = tm.compute_loss(torch.as_tensor(ids), torch.as_tensor(labels), torch.as_tensor(mask))
    lj = _logits_masked(jm, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    out_j = _loss_masked(jm, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32),
                         jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(out_j.counts), out_t.counts.numpy(), err_msg="router counts")
    record("router counts, padded (exact)", dtype, 0.0, 0.0, "exact")
    real = mask.astype(bool)
    assert np.isfinite(np32(lj)).all() and np.isfinite(np32(lt)).all()  # padded rows: finite, don't-care
    assert_close("model logits, padded (real positions)", dtype, np32(lj)[real], np32(lt)[real])
    if dtype == "bfloat16":
        k = kl(np32(lt)[real], np32(lj)[real])
        record("model logits KL, padded", dtype, k, 1e-3, "KL(torch||jax)")
        assert k < 1e-3
    for name in ("loss", "main_loss", "mtp_loss", "balance_loss"):
        assert_close(f"loss, padded: {name}", dtype, getattr(out_j, name), getattr(out_t, name), TOL[dtype])
    assert_close("loss, padded: mtp_losses", dtype, out_j.mtp_losses, out_t.mtp_losses, TOL[dtype])


_cached_step_masked = nnx.jit(lambda m, t, c, p, am: m.forward_cached(t, c, p, am))
_cached_step = nnx.jit(lambda m, t, c, p: m.forward_cached(t, c, p))


def test_cached_logits_agree_with_attention_mask():
    tm, jm = make_pair(TINY, "float32", "torch", seed=17)
    ids, _, mask = padded_batch(TINY, seed=5)
    mask[1] = 1  # decoding: left padding only
    tc, jc = tm.init_cache(2, 14, "latent"), jm.init_cache(2, 14, "latent")
    step = _cached_step_masked
    for a, b in [(0, 6), (6, 7), (7, 12)]:
        am = mask[:, a:b]
        with torch.no_grad():
            lt, tc = tm.forward_cached(torch.as_tensor(ids[:, a:b]), tc, a, torch.as_tensor(am))
        lj, jc = step(jm, jnp.asarray(ids[:, a:b], jnp.int32), jc, jnp.int32(a), jnp.asarray(am, jnp.int32))
        real = am.astype(bool)
        assert_close("model decode logits, padded (latent cache)", "float32", np32(lj)[real], np32(lt)[real])


# -------------------------------------------------------------- gradients
def torch_grads(tm, ids, labels) -> tuple[dict, object]:
    tm.zero_grad(set_to_none=True)
    out = tm.compute_loss(torch.as_tensor(ids), torch.as_tensor(labels))
    out.loss.backward()
    return {n: p.grad.detach().float().numpy().copy() for n, p in tm.named_parameters()}, out


# One jitted gradient for the module (and test_parity_random_configs): models of one config and dtype
# share its compiled program instead of compiling a fresh closure per call.
_grad = nnx.jit(nnx.grad(lambda m, a, b: m.compute_loss(a, b).loss))


def jax_grads(jm, ids, labels) -> dict:
    """Gradient of the total loss for every nnx.Param, returned in canonical names and torch layout."""
    grads = _grad(jm, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32))
    g_model = nnx.clone(jm)
    nnx.update(g_model, grads)
    return {k: v for k, v in g_model.canonical_state().items() if not k.endswith("gate.bias")}


def grad_err(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


def assert_fp32_gradients_agree(tm, jm, component=None) -> None:
    """Every parameter's fp32 gradient of the loss on batch(seed=1), torch vs JAX, per tensor within
    GRAD_TOL (recorded under ``component``, or the parameter's group)."""
    ids, labels = batch(TINY, seed=1)
    gt, _ = torch_grads(tm, ids, labels)
    gj = jax_grads(jm, ids, labels)
    assert set(gt) == set(gj), set(gt) ^ set(gj)
    worst = []
    for name in sorted(gt):
        e = grad_err(gj[name], gt[name])
        record(component or "grad " + _group(name), "float32", e, GRAD_TOL["float32"], "max|d|/max|g| per tensor")
        if e > GRAD_TOL["float32"]:
            worst.append((name, e))
    assert not worst, f"gradients differ: {worst[:10]}"


@pytest.mark.parametrize("born", ["torch", "jax"])
def test_gradients_every_parameter(born):
    assert_fp32_gradients_agree(*make_pair(TINY, "float32", born, seed=12))


def test_scanned_layers_logits_loss_counts_gradients():
    """The JAX model with scanned layers (scan_layers=True: a dense and a MoE stack run by lax.scan, loaded
    from the same canonical state) against torch in fp32: logits, losses, counts, every gradient."""
    tm, jm = make_pair(TINY, "float32", "torch", seed=13, scan_layers=True)
    assert jm.layers is None and jm.moe_stack is not None
    compare_forward(tm, jm, TINY, "float32", tag=" (scanned layers)")
    assert_fp32_gradients_agree(tm, jm, "grad (scanned layers)")


def test_gradients_bf16_every_parameter():
    """bf16 gradients: relative Frobenius error per tensor, ||g_jax - g_torch|| / ||g_torch|| <= 2e-2, and
    the element-wise max|g_jax - g_torch| / max|g_torch| per tensor <= 0.1 (measured worst over the 67
    tensors: 2.5e-2; it compounds bf16 rounding through the backward pass, so it gets ~4x headroom: ~13 bf16
    ulps of the tensor's largest entry; a wrong or missing term moves it to O(1))."""
    tm, jm = make_pair(TINY, "bfloat16", "torch", seed=12)
    ids, labels = batch(TINY, seed=1)
    gt, _ = torch_grads(tm, ids, labels)
    gj = {k: np.asarray(v, np.float32) for k, v in jax_grads(jm, ids, labels).items()}
    assert set(gt) == set(gj)
    worst = []
    for name in sorted(gt):
        n = np.linalg.norm(gt[name])
        e = float(np.linalg.norm(gj[name] - gt[name]) / n) if n > 0 else float(np.linalg.norm(gj[name]))
        record("grad (all params, ||d||/||g||)", "bfloat16", e, 2e-2, "||d||/||g|| per tensor")
        m = grad_err(gj[name], gt[name])
        record("grad (all params, max|d|/max|g|)", "bfloat16", m, 0.1, "max|d|/max|g| per tensor")
        if e > 2e-2 or m > 0.1:
            worst.append((name, e, m))
    assert not worst, worst[:10]


def _group(name: str) -> str:
    """Canonical name -> a component label for the error table."""
    parts = name.split(".")
    if parts[0] in ("embed", "norm", "head"):
        return parts[0]
    prefix = "mtp " if parts[0] == "mtp" else ""
    rest = parts[2:] if parts[0] == "layers" else parts[2:]
    if rest and rest[0] == "block":
        rest = rest[1:]
    if rest[0] in ("enorm", "hnorm", "eh_proj", "norm"):
        return prefix + rest[0]
    if rest[0] == "ffn" and len(rest) > 1 and rest[1] in ("gate", "experts", "shared_experts"):
        return prefix + "ffn." + rest[1]
    return prefix + rest[0]


# ------------------------------------------------------ optimizer + bias
LR, BETAS, EPS, WD, GAMMA = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1e-3


def _decay_mask(state):
    """dsv3.training.decays on the nnx state paths (same rule as the canonical names in torch)."""
    name = lambda path: ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    return jax.tree_util.tree_map_with_path(lambda path, v: decays(name(path), v.ndim), state)


@nnx.jit
def _jax_step(m, o, grads, counts):
    o.update(m, grads)
    m.update_router_bias(counts, GAMMA)


def test_one_adamw_step_and_bias_update():
    """dsv3_torch.train's AdamW (torch's fused kernel) vs optax.adamw (same hyper-parameters, weight decay on
    the same parameters by dsv3.training.decays), then update_router_bias with the step's counts: same
    weights, same biases.

    Both optimizers get torch's gradients (ported by canonical name): the first Adam step is about
    lr * g / (|g| + eps), which turns the 1e-6-relative gradient noise of entries with |g| ~ eps into
    O(lr) differences; gradients themselves are compared in test_gradients_every_parameter. The same
    step on JAX's own gradients is recorded too (informational)."""
    tm, jm = make_pair(TINY, "float32", "torch", seed=13)
    jm_own = nnx.clone(jm)
    ids, labels = batch(TINY, seed=2)
    params = dict(tm.named_parameters())
    groups = [{"params": [p for n, p in params.items() if decays(n, p.ndim)], "weight_decay": WD},
              {"params": [p for n, p in params.items() if not decays(n, p.ndim)], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]
    opt = adamw(groups, lr=LR, betas=BETAS, eps=EPS)
    gt, out_t = torch_grads(tm, ids, labels)
    opt.step()
    tm.update_router_bias(out_t.counts, GAMMA)

    tx = lambda: optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD, mask=_decay_mask)
    g_model = nnx.clone(jm)
    g_model.load_canonical_state({**gt, **{r: np.zeros(TINY.n_routed_experts, np.float32)
                                           for r in jm.canonical_state() if r.endswith("gate.bias")}})
    grads = nnx.state(g_model, nnx.Param)
    counts = jnp.asarray(out_t.counts.numpy())
    _jax_step(jm, nnx.Optimizer(jm, tx(), wrt=nnx.Param), grads, counts)
    st, sj = tm.canonical_state(), jm.canonical_state()
    worst = []
    for name in st:
        if name.endswith("gate.bias"):
            np.testing.assert_array_equal(sj[name], st[name], err_msg=name)
            record("bias update (exact)", "float32", 0.0, 0.0, "exact")
            continue
        e = float(np.abs(sj[name] - st[name]).max())
        record("AdamW step (same grads)", "float32", e / LR, 1e-3, "max|d| / lr")
        if e > 1e-3 * LR:
            worst.append((name, e))
    assert not worst, worst[:10]

    # JAX's own gradients and counts (the module's jitted gradient and loss, programs the tests above compiled),
    # then the same jitted AdamW + bias step (informational for the weights). The fused jitted train step
    # (value_and_grad, optimizer and bias update in one program) is dsv3_jax.train's, held to torch's over 50
    # steps in tests/test_train_parity.py.
    a, b = jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32)
    c_own = _loss(jm_own, a, b).counts
    _jax_step(jm_own, nnx.Optimizer(jm_own, tx(), wrt=nnx.Param), _grad(jm_own, a, b), c_own)
    np.testing.assert_array_equal(np.asarray(c_own), out_t.counts.numpy())
    so = jm_own.canonical_state()
    worst = []
    for name in st:
        if name.endswith("gate.bias"):
            np.testing.assert_array_equal(so[name], st[name], err_msg=name)
            continue
        # The first step moves an entry by lr * g / (|g| + eps) (+ decay): where |g| >> eps that is lr * sign(g)
        # whatever the gradient's rounding, so the weights must agree as with the same gradients; where |g| is
        # within rounding of eps, the two gradients' 1e-6-relative noise legitimately moves it by O(lr), bounded
        # by lr per framework.
        d = np.abs(so[name] - st[name]) / LR
        clear = np.abs(gt[name]) > 1e3 * EPS
        e_clear, e_all = float(d[clear].max(initial=0.0)), float(d.max())
        record("AdamW step (own grads, |g| > 1e3 eps)", "float32", e_clear, 1e-3, "max|d| / lr")
        record("AdamW step (own grads, every entry)", "float32", e_all, 1.0, "max|d| / lr")
        if e_clear > 1e-3 or e_all > 1.0:
            worst.append((name, e_clear, e_all))
    assert not worst, worst[:10]


# --------------------------------------------------------------- decoding
@pytest.mark.parametrize("cache", ["latent", "naive"])
def test_greedy_generation_same_tokens(cache):
    tm, jm = make_pair(TINY, "float32", "jax", seed=14)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    a = dsv3_jax.generate(jm, prompts, 8, cache=cache)
    b = dsv3_torch.generate(tm, prompts, 8, cache=cache)
    record("greedy decode (token mismatches)", "float32", sum(x != y for p, q in zip(a, b) for x, y in zip(p, q)), 0,
           "count")
    assert a == b


def test_cached_logits_agree():
    tm, jm = make_pair(TINY, "float32", "torch", seed=15)
    ids, _ = batch(TINY, T=9, seed=3)
    tc, jc = tm.init_cache(2, 9, "latent"), jm.init_cache(2, 9, "latent")
    step = _cached_step
    for a, b in [(0, 6), (6, 7), (7, 8), (8, 9)]:
        with torch.no_grad():
            lt, tc = tm.forward_cached(torch.as_tensor(ids[:, a:b]), tc, a)
        lj, jc = step(jm, jnp.asarray(ids[:, a:b], jnp.int32), jc, jnp.int32(a))
        assert_close("model decode logits (latent cache)", "float32", lj, lt)
