"""JAX rows of ``dsv3 bench``: jitted train step, prefill, decoding with the
latent and the naive cache, the MoE layer against a dense MLP.

Every jitted function uses the split/merge pattern (``nnx.split`` outside,
``nnx.merge`` inside ``jax.jit``, new state returned and the old buffers
donated), so a call pays no NNX graph traversal in Python.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from dsv3 import flops
from dsv3.bench.common import BETAS, CLIP, LR, WEIGHT_DECAY, Ctx, backend_train_step
from dsv3.bench.peak import jax_device
from dsv3.bench.timing import PeakMemory, jax_sync, measure


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name]


def build(ctx: Ctx, mtp: bool):
    import dsv3_jax
    from flax import nnx

    cfg = ctx.config(mtp)
    try:
        model = dsv3_jax.DeepSeekV3(cfg, rngs=nnx.Rngs(0), dtype=jax_dtype(ctx.dtype))
    except TypeError:
        model = dsv3_jax.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    model.load_canonical_state(ctx.weights(mtp))
    return model


def _batch(ctx: Ctx):
    import jax.numpy as jnp

    return jnp.asarray(ctx.inputs, dtype=jnp.int32), jnp.asarray(ctx.labels, dtype=jnp.int32)


def make_train_step(model):
    """forward + backward + optax AdamW + router-bias update, one jitted call."""
    import jax
    import optax
    from flax import nnx

    tx = optax.chain(optax.clip_by_global_norm(CLIP),
                     optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            out = m.compute_loss(x, y)
            return out.loss, out.counts

        (loss, counts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        model.update_router_bias(counts)
        return loss, nnx.state((model, opt))

    return step, state


def run_all(ctx: Ctx, sections: list[str]) -> None:
    import jax

    with jax.default_device(jax_device(ctx.device)):
        if "train" in sections:
            for mtp in ctx.mtp_settings():
                name = "jax jit" + (" +MTP" if mtp else "")
                ctx.guard("train", name, "jax", lambda: _train_row(ctx, name, mtp), variant="jit", mtp=mtp)
        if "prefill" in sections:
            ctx.guard("prefill", "jax jit", "jax", lambda: _prefill_row(ctx))
        if "decode" in sections:
            _decode_rows(ctx)
        if "moe" in sections and ctx.cfg.n_moe_layers:
            ctx.guard("moe", "jax", "jax", lambda: _moe_rows(ctx))


def _train_row(ctx: Ctx, name: str, mtp: bool) -> None:
    got = backend_train_step(ctx, "jax", mtp)
    if got is not None:
        step, impl = got
    else:
        step, impl = _minimal_step(ctx, mtp), "bench minimal step (split/merge jax.jit, optax adamw)"
    losses = []

    def timed():
        loss = step()
        if not losses:
            losses.append(float(loss[0] if isinstance(loss, tuple) else loss))
            last = getattr(step, "last", None)
            losses.append(float(last["main_loss"]) if last and "main_loss" in last else None)
        return loss

    with PeakMemory(ctx.device, "jax") as mem:
        t = measure(timed, jax_sync, warmup=ctx.warmup, reps=ctx.reps)
    last = timed()
    last = float(last[0] if isinstance(last, tuple) else last)
    ctx.add("train", name, "jax", t, tokens=ctx.batch * ctx.seq, model_flops=ctx.train_flops(mtp),
            mem=mem, variant="jit", mtp=mtp, loss_first=losses[0], main_loss_first=losses[1], loss_after=last,
            step_impl=impl)


def _minimal_step(ctx: Ctx, mtp: bool):
    model = build(ctx, mtp)
    jstep, state = make_train_step(model)
    del model
    x, y = _batch(ctx)
    holder = [state]

    def step():
        loss, holder[0] = jstep(holder[0], x, y)
        return loss, holder[0]

    return step


def _prefill_row(ctx: Ctx) -> None:
    import jax
    from flax import nnx

    graphdef, state = nnx.split(build(ctx, False))
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    x, _ = _batch(ctx)
    with PeakMemory(ctx.device, "jax") as mem:
        t = measure(lambda: fwd(state, x), jax_sync, warmup=ctx.warmup, reps=ctx.reps)
    ctx.add("prefill", "jax jit", "jax", t, tokens=ctx.batch * ctx.seq, model_flops=ctx.forward_flops(),
            mem=mem, variant="jit")


# ------------------------------------------------------------------ decoding
def cache_nbytes(cache) -> int:
    import jax

    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache) if hasattr(a, "shape"))


def _decode_rows(ctx: Ctx) -> None:
    import jax
    from flax import nnx

    graphdef, state = nnx.split(build(ctx, False))

    @partial(jax.jit, donate_argnums=2)
    def fwd_cached(st, tok, cache, pos):
        return nnx.merge(graphdef, st).forward_cached(tok, cache, pos)

    model = nnx.merge(graphdef, state)
    for kind in ("latent", "naive"):
        for n in ctx.contexts:
            name = f"jax {kind} @{n}"
            ctx.guard("decode", name, "jax", lambda: _decode_row(ctx, model, state, fwd_cached, kind, n, name),
                      kind=kind, context=n)


def _decode_row(ctx: Ctx, model, state, fwd_cached, kind: str, n: int, name: str) -> None:
    import jax.numpy as jnp

    B, steps = ctx.decode_batch, ctx.decode_steps
    max_len = n + steps
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, ctx.cfg.vocab_size, (B, n)), dtype=jnp.int32)
    with PeakMemory(ctx.device, "jax") as mem:
        cache = model.init_cache(B, max_len, kind=kind)
        per_token = cache_nbytes(cache) / (B * max_len) / ctx.cfg.num_hidden_layers
        t0 = time.perf_counter()
        chunk = min(n, ctx.args.prefill_chunk)
        for s in range(0, n, chunk):
            logits, cache = fwd_cached(state, prompt[:, s:s + chunk], cache, jnp.int32(s))
        jax_sync(logits)
        prefill_s = time.perf_counter() - t0  # includes compiling the chunk shape
        tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        holder = [cache, 0]

        def step():
            pos = jnp.int32(n + holder[1] % steps)
            holder[1] += 1
            out, holder[0] = fwd_cached(state, tok, holder[0], pos)
            return out

        t = measure(step, jax_sync, warmup=ctx.warmup, reps=ctx.args.decode_reps)
    ctx.add("decode", name, "jax", t, tokens=B, mem=mem, kind=kind, context=n, batch=B,
            cache_bytes_per_token_per_layer=per_token,
            cache_values_per_token_per_layer=per_token / flops.DTYPE_BYTES[ctx.dtype],
            prefill_chunked_s=prefill_s, decode_flops_per_token=flops.decode_flops_per_token(ctx.cfg, n, kind))


# ------------------------------------------------------------------ MoE layer
def find_moe(ctx: Ctx, model):
    """The first MoE layer's ffn module (or a fresh MoE with the same config)."""
    cfg = ctx.cfg
    layers = getattr(model, "layers", None)
    try:
        ffn = layers[cfg.first_k_dense_replace].ffn
        if hasattr(ffn, "experts"):
            return ffn, "model.layers[first MoE].ffn"
    except (TypeError, IndexError, KeyError, AttributeError):
        pass
    import dsv3_jax.moe as jmoe
    from flax import nnx

    try:
        return jmoe.MoE(cfg, rngs=nnx.Rngs(0), dtype=jax_dtype(ctx.dtype)), "fresh dsv3_jax.moe.MoE"
    except TypeError:
        return jmoe.MoE(cfg, rngs=nnx.Rngs(0)), "fresh dsv3_jax.moe.MoE"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _moe_rows(ctx: Ctx) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    cfg = ctx.cfg
    moe, source = find_moe(ctx, build(ctx, False))
    jdt = jax_dtype(ctx.dtype)
    D = cfg.hidden_size
    W = flops.moe_layer_flops_per_token(cfg)["dense_equivalent_width"]
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((ctx.batch, ctx.seq, D), dtype=np.float32), dtype=jdt)
    dense_w = tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02, dtype=jdt)
                    for s in ((D, W), (W, D), (D, W)))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def moe_apply(p, xx):
        return _first(nnx.merge(graphdef, p, rest)(xx))

    def dense_apply(w, xx):
        return (jax.nn.silu(xx @ w[0]) * (xx @ w[2])) @ w[1]

    N = ctx.batch * ctx.seq
    fl = flops.moe_layer_flops_per_token(cfg)
    for label, apply, w, f_tok in (("moe", moe_apply, params, fl["total"]), ("dense", dense_apply, dense_w,
                                                                              fl["experts"])):
        fwd = jax.jit(apply)
        grad = jax.jit(jax.grad(lambda w_, x_: apply(w_, x_).astype(jnp.float32).sum(), argnums=(0, 1)))
        tf = measure(lambda: fwd(w, x), jax_sync, warmup=ctx.warmup, reps=ctx.reps)
        tb = measure(lambda: grad(w, x), jax_sync, warmup=ctx.warmup, reps=ctx.reps)
        ctx.add("moe", f"jax {label} forward", "jax", tf, tokens=N, model_flops=N * f_tok, kind=label,
                phase="forward", source=source if label == "moe" else "bench SwiGLU")
        ctx.add("moe", f"jax {label} fwd+bwd", "jax", tb, tokens=N, model_flops=3 * N * f_tok, kind=label,
                phase="fwd+bwd", source=source if label == "moe" else "bench SwiGLU")
