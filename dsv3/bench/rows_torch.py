"""PyTorch rows of ``dsv3 bench``: train step (eager, torch.compile), prefill,
decoding with the latent and the naive cache, the MoE layer against a dense MLP."""

from __future__ import annotations

import numpy as np

from dsv3 import flops
from dsv3.bench.common import BETAS, CLIP, LR, WEIGHT_DECAY, Ctx, backend_train_step
from dsv3.bench.timing import PeakMemory, measure, torch_sync


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build(ctx: Ctx, mtp: bool, dtype: str | None = None):
    import dsv3_torch

    cfg = ctx.config(mtp)
    tdt = torch_dtype(dtype or ctx.dtype)
    try:
        model = dsv3_torch.DeepSeekV3(cfg, dtype=tdt)
    except TypeError:
        model = dsv3_torch.DeepSeekV3(cfg).to(tdt)
    model.load_canonical_state(ctx.weights(mtp))
    return model.to(ctx.device)


def _batch(ctx: Ctx):
    import torch

    x = torch.as_tensor(ctx.inputs, dtype=torch.long, device=ctx.device)
    y = torch.as_tensor(ctx.labels, dtype=torch.long, device=ctx.device)
    return x, y


def make_train_step(ctx: Ctx, mtp: bool, compile_: bool):
    """One optimizer step: forward + backward + AdamW + router-bias update.

    The training engineer's ``dsv3_torch.train`` backend when it exists (what
    ``dsv3 train`` runs); otherwise a minimal step on the public model API.
    Returns (step, description).
    """
    got = backend_train_step(ctx, "torch", mtp, compile_)
    if got is not None:
        return got
    return _minimal_train_step(ctx, mtp, compile_), "bench minimal step (compute_loss, AdamW, update_router_bias)"


def _minimal_train_step(ctx: Ctx, mtp: bool, compile_: bool):
    import torch

    model = build(ctx, mtp).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = ctx.device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                            **({"fused": True} if fused else {"foreach": True}))
    loss_fn = model.compute_loss
    if compile_:
        loss_fn = torch.compile(loss_fn)
    x, y = _batch(ctx)

    def step():
        out = loss_fn(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.update_router_bias(out.counts)
        return out.loss

    return step


def train_rows(ctx: Ctx) -> None:
    variants = ["eager", "compile"] if "compile" not in ctx.args.skip else ["eager"]
    for variant in variants:
        for mtp in ctx.mtp_settings():
            if variant == "compile" and ctx.args.quick and not mtp and ctx.has_mtp:
                continue  # --quick: compile once (MTP on)
            name = f"torch {variant}" + (" +MTP" if mtp else "")
            ctx.guard("train", name, "torch", lambda: _train_row(ctx, name, variant, mtp),
                      variant=variant, mtp=mtp)


def _train_row(ctx: Ctx, name: str, variant: str, mtp: bool) -> None:
    step, impl = make_train_step(ctx, mtp, variant == "compile")
    losses = []

    def timed():
        loss = step()
        if not losses:
            losses.append(float(loss))
            losses.append(_main_loss(step))
        return loss

    with PeakMemory(ctx.device, "torch") as mem:
        # torch.compile: automatic dynamic shapes recompile twice after the first call; keep those
        # recompiles out of the steady state (they are in first_s / warmup_s).
        warmup = max(ctx.warmup, 3) if variant == "compile" else ctx.warmup
        t = measure(timed, torch_sync(ctx.device), warmup=warmup, reps=ctx.reps)
    last = float(step())
    ctx.add("train", name, "torch", t, tokens=ctx.batch * ctx.seq, model_flops=ctx.train_flops(mtp),
            mem=mem, variant=variant, mtp=mtp, loss_first=losses[0], main_loss_first=losses[1],
            loss_after=last, step_impl=impl)


def _main_loss(step):
    last = getattr(step, "last", None)
    return float(last["main_loss"]) if last and "main_loss" in last else None


def prefill_rows(ctx: Ctx) -> None:
    ctx.guard("prefill", "torch eager", "torch", lambda: _prefill_row(ctx))


def _prefill_row(ctx: Ctx) -> None:
    import torch

    model = build(ctx, False).eval()
    x, _ = _batch(ctx)
    with torch.inference_mode(), PeakMemory(ctx.device, "torch") as mem:
        t = measure(lambda: model(x), torch_sync(ctx.device), warmup=ctx.warmup, reps=ctx.reps)
    ctx.add("prefill", "torch eager", "torch", t, tokens=ctx.batch * ctx.seq, model_flops=ctx.forward_flops(),
            mem=mem, variant="eager")


# ------------------------------------------------------------------ decoding
def cache_nbytes(cache) -> int:
    """Bytes of every array in a (nested) cache structure."""
    import torch

    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, np.ndarray):
        return cache.nbytes
    if isinstance(cache, dict):
        return sum(cache_nbytes(v) for v in cache.values())
    if isinstance(cache, (list, tuple)):
        return sum(cache_nbytes(v) for v in cache)
    if hasattr(cache, "__dict__"):
        return sum(cache_nbytes(v) for v in vars(cache).values())
    return 0


def decode_rows(ctx: Ctx) -> None:
    import torch

    model = build(ctx, False).eval()
    for kind in ("latent", "naive"):
        for n in ctx.contexts:
            name = f"torch {kind} @{n}"
            ctx.guard("decode", name, "torch", lambda: _decode_row(ctx, model, kind, n, name),
                      kind=kind, context=n)
    del model
    torch.cuda.empty_cache() if ctx.device.startswith("cuda") else None


def _decode_row(ctx: Ctx, model, kind: str, n: int, name: str) -> None:
    import time

    import torch

    B, steps = ctx.decode_batch, ctx.decode_steps
    max_len = n + steps
    rng = np.random.default_rng(1)
    prompt = torch.as_tensor(rng.integers(0, ctx.cfg.vocab_size, (B, n)), dtype=torch.long, device=ctx.device)
    sync = torch_sync(ctx.device)
    with torch.inference_mode(), PeakMemory(ctx.device, "torch") as mem:
        cache = model.init_cache(B, max_len, kind=kind)
        per_token = cache_nbytes(cache) / (B * max_len) / ctx.cfg.num_hidden_layers
        t0 = time.perf_counter()
        chunk = min(n, ctx.args.prefill_chunk)
        for s in range(0, n, chunk):
            logits, cache = model.forward_cached(prompt[:, s:s + chunk], cache, s)
        sync(logits)
        prefill_s = time.perf_counter() - t0
        tok = logits[:, -1:].argmax(-1)
        counter = [0]

        def step():
            pos = n + counter[0] % steps
            counter[0] += 1
            out, _ = model.forward_cached(tok, cache, pos)
            return out

        t = measure(step, sync, warmup=ctx.warmup, reps=ctx.args.decode_reps)
    ctx.add("decode", name, "torch", t, tokens=B, mem=mem, kind=kind, context=n, batch=B,
            cache_bytes_per_token_per_layer=per_token,
            cache_values_per_token_per_layer=per_token / _elt(ctx.dtype),
            prefill_chunked_s=prefill_s, decode_flops_per_token=flops.decode_flops_per_token(ctx.cfg, n, kind))


def _elt(dtype: str) -> int:
    return flops.DTYPE_BYTES[dtype]


# ------------------------------------------------------------------ MoE layer
def find_moe(model, cfg):
    ffn = model.layers[cfg.first_k_dense_replace].ffn
    if not hasattr(ffn, "experts"):
        raise RuntimeError(f"layers[{cfg.first_k_dense_replace}].ffn has no experts")
    return ffn


def moe_rows(ctx: Ctx) -> None:
    if ctx.cfg.n_moe_layers == 0:
        return
    ctx.guard("moe", "torch", "torch", lambda: _moe_rows(ctx))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _moe_rows(ctx: Ctx) -> None:
    import torch
    import torch.nn.functional as F

    cfg = ctx.cfg
    model = build(ctx, False).train()
    moe = find_moe(model, cfg)
    tdt = torch_dtype(ctx.dtype)
    D = cfg.hidden_size
    W = flops.moe_layer_flops_per_token(cfg)["dense_equivalent_width"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(ctx.batch, ctx.seq, D, generator=g).to(ctx.device, tdt)
    w1, w3 = (torch.randn(W, D, generator=g) * 0.02 for _ in range(2))
    w2 = torch.randn(D, W, generator=g) * 0.02
    dense_w = [w.to(ctx.device, tdt).requires_grad_(True) for w in (w1, w2, w3)]

    def dense(xx):
        return F.linear(F.silu(F.linear(xx, dense_w[0])) * F.linear(xx, dense_w[2]), dense_w[1])

    sync = torch_sync(ctx.device)
    N = ctx.batch * ctx.seq
    fl = flops.moe_layer_flops_per_token(cfg)
    results = {}
    for label, fn, f_tok in (("moe", lambda xx: _first(moe(xx)), fl["total"]), ("dense", dense, fl["experts"])):
        with torch.inference_mode():
            tf = measure(lambda: fn(x), sync, warmup=ctx.warmup, reps=ctx.reps)
        xg = x.detach().clone().requires_grad_(True)
        params = list(moe.parameters()) if label == "moe" else dense_w

        def fwd_bwd():
            for p in params:
                p.grad = None
            xg.grad = None
            y = fn(xg)
            y.float().sum().backward()
            return y

        tb = measure(fwd_bwd, sync, warmup=ctx.warmup, reps=ctx.reps)
        results[label] = (tf, tb)
        ctx.add("moe", f"torch {label} forward", "torch", tf, tokens=N, model_flops=N * f_tok,
                kind=label, phase="forward")
        ctx.add("moe", f"torch {label} fwd+bwd", "torch", tb, tokens=N, model_flops=3 * N * f_tok,
                kind=label, phase="fwd+bwd")
