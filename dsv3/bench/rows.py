"""The rows of ``dsv3 bench``, written once for every framework.

Each driver (training step, prefill, decoding, MoE layer against a dense MLP)
times one kind of work the same way for every framework; what differs per
framework (building the model, making the batch, one step, synchronising,
peak memory) comes from an :class:`Adapter` (``rows_torch``, ``rows_jax``,
``rows_hf``). Speculative decoding (plain ``generate`` against ``speculative="mtp"`` on the same
prompts) is timed for torch and JAX; generation after a long prompt for torch, JAX and transformers. The
matmul peak sweep is ``peak.measure_peak``.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from dsv3 import flops
from dsv3.bench.common import Ctx, backend_train_step, framework_peak_key
from dsv3.bench.timing import PeakMemory, measure


class Row(NamedTuple):
    """One training-step or prefill row: ``make()`` builds what is timed (on the bench's
    weights and batch), ``extra`` goes into the row."""

    name: str
    make: Callable[[], Any]
    extra: dict


class Adapter:
    """What one framework supplies to the drivers; its subclasses are ``rows_torch.TorchAdapter``,
    ``rows_jax.JaxAdapter`` and ``rows_hf.HFAdapter``.

    - ``framework``: the rows' ``framework`` field (and PeakMemory's allocator choice);
    - ``sync(out)``: wait until ``out`` (and the device) is finished;
    - ``train_rows()``: :class:`Row` s whose ``make()`` gives (step, description), ``step()`` one
      optimizer step returning the loss; ``prefill_rows()``: rows whose ``make()`` gives a forward
      of no arguments;
    - ``decoder()``: (init_cache(batch, max_len, kind), forward_cached(tokens, cache, pos) -> (logits, cache));
    - ``tokens(a)``: int token ids [B, S] on the device; ``next_token(logits)``: the greedy next token [B, 1];
    - ``moe_and_dense(x, dense_w, dy)``: {"moe" | "dense": (forward(), forward_and_backward(), extra row
      fields)} from the numpy arrays of :func:`moe_inputs` (the backward takes dy as the output's gradient);
    - ``matmul(b, M, K, N, layout)``: one product of :func:`operand_shapes` as a call of no arguments (its
      ``operands``: the two stored operands), and
      ``peak_info()``, the peak sweep's record of the device;
    - ``long_generator()``: ``f(prompt, max_new_tokens)``, greedy generation of one prompt (a list of token
      ids) on the bench's weights without MTP, returning the new tokens;
    - ``generators()`` (torch and JAX only): (generate, speculative_generate) of the framework, bound to
      the model with its MTP depth on the bench's weights: ``f(prompts, max_new_tokens, **kw)``.
    """

    framework = ""
    kernels = "out_in"  # how a Linear's weight is stored: the floor's operand layouts (dsv3.flops.step_matmuls)

    def __init__(self, ctx: Ctx, dtype: Optional[str] = None):
        self.ctx = ctx
        self.dtype_name = dtype or ctx.dtype  # the matmuls' dtype ("fp32" | "bf16"); None: the run's

    @property
    def peak_key(self) -> str:
        return framework_peak_key(self.framework, None if self.dtype_name == self.ctx.dtype else self.dtype_name)

    def extra_dtype_train_rows(self, name: str, variant: str, compile_: bool = False):
        """--bf16-rows: the training step in each extra dtype, MTP off."""
        for dt in self.ctx.extra_dtypes:
            yield Row(f"{name} {dt}", partial(backend_train_step, self.ctx, self.framework, False, compile_, dt),
                      {"variant": variant, "mtp": False, "dtype": dt})

    def scope(self):
        """The context every row of this framework runs in."""
        return contextlib.nullcontext()

    def inference(self):
        """The context of forward-only timing."""
        return contextlib.nullcontext()

    def matmuls(self, M: int, K: int, N: int) -> dict:
        """The peak sweep's products: {"nn": A[M,K] @ B[K,N], "nt": A @ W[N,K].T}."""
        return {layout: self.matmul(1, M, K, N, layout) for layout in ("nn", "nt")}


def operand_shapes(b: int, M: int, K: int, N: int, layout: str) -> tuple[tuple, tuple]:
    """The stored operands of C[b, M, N] (``dsv3.flops.Matmul``'s layouts): nn A[M,K]·B[K,N], nt A·W[N,K]ᵀ,
    tn A[K,M]ᵀ·B; b = 1 is a 2-D product."""
    a, w = {"nn": ((M, K), (K, N)), "nt": ((M, K), (N, K)), "tn": ((K, M), (K, N))}[layout]
    lead = (b,) if b > 1 else ()
    return lead + a, lead + w


def run_rows(ctx: Ctx, ad: Adapter, sections) -> None:
    """Every row of ``sections`` for one framework."""
    with ad.scope():
        if "train" in sections:
            for row in ad.train_rows():
                ctx.guard("train", row.name, ad.framework, lambda: _train_row(ctx, ad, row), **row.extra)
        if "prefill" in sections:
            for row in ad.prefill_rows():
                ctx.guard("prefill", row.name, ad.framework, lambda: _prefill_row(ctx, ad, row), **row.extra)
        if "decode" in sections:
            ctx.guard("decode", ad.framework, ad.framework, lambda: _decode_rows(ctx, ad))
        if "moe" in sections and ctx.cfg.n_moe_layers:
            ctx.guard("moe", ad.framework, ad.framework, lambda: _moe_rows(ctx, ad))
        if "speculative" in sections and ctx.has_mtp and hasattr(ad, "generators"):
            ctx.guard("speculative", ad.framework, ad.framework, lambda: _speculative_rows(ctx, ad))
        if "long" in sections:
            ctx.guard("long", ad.framework, ad.framework, lambda: _long_row(ctx, ad))


# ------------------------------------------------------------ training step
def _train_row(ctx: Ctx, ad: Adapter, row: Row) -> None:
    """One optimizer step timed; the first step's loss and main loss, and the loss after timing."""
    step, impl = row.make()
    first = {}

    def timed():
        loss = step()
        if not first:
            first["loss"] = float(loss)
            last = getattr(step, "last", None) or {}  # the step's metrics, when it reports them
            first["main"] = float(last["main_loss"]) if "main_loss" in last else first["loss"]
        return loss

    with PeakMemory(ctx.device, ad.framework) as mem:
        t = measure(timed, ad.sync, warmup=ctx.warmup, reps=ctx.reps)
    mtp = row.extra["mtp"]
    floor = ctx.floor_s(ad.framework, mtp, row.extra.get("dtype"))
    ctx.add("train", row.name, ad.framework, t, tokens=ctx.batch * ctx.seq, model_flops=ctx.train_flops(mtp),
            mem=mem, **row.extra, loss_first=first["loss"], main_loss_first=first["main"],
            loss_after=float(step()), step_impl=impl, floor_s=floor, vs_floor=floor and t.median_s / floor)


# ------------------------------------------------------------------ prefill
def _prefill_row(ctx: Ctx, ad: Adapter, row: Row) -> None:
    forward = row.make()
    with ad.inference(), PeakMemory(ctx.device, ad.framework) as mem:
        t = measure(forward, ad.sync, warmup=ctx.warmup, reps=ctx.reps)
    ctx.add("prefill", row.name, ad.framework, t, tokens=ctx.batch * ctx.seq, model_flops=ctx.forward_flops(),
            mem=mem, **row.extra)


# ----------------------------------------------------------------- decoding
def nbytes(tree) -> int:
    """Bytes of every array in a (nested) cache structure: dicts, lists, tuples, objects."""
    if hasattr(tree, "nbytes") and hasattr(tree, "shape"):
        return int(tree.nbytes)
    if isinstance(tree, dict):
        tree = list(tree.values())
    elif not isinstance(tree, (list, tuple)):
        tree = list(vars(tree).values()) if hasattr(tree, "__dict__") else []
    return sum(nbytes(v) for v in tree)


def _decode_rows(ctx: Ctx, ad: Adapter) -> None:
    dec = ad.decoder()
    for kind in ("latent", "naive"):
        for n in ctx.contexts:
            name = f"{ad.framework} {kind} @{n}"
            ctx.guard("decode", name, ad.framework, lambda: _decode_row(ctx, ad, dec, kind, n, name),
                      kind=kind, context=n)


def _decode_row(ctx: Ctx, ad: Adapter, dec, kind: str, n: int, name: str) -> None:
    """Fill a cache of n + decode_steps with an n-token prompt (chunked), then time one-token steps."""
    init_cache, forward_cached = dec
    B, steps = ctx.decode_batch, ctx.decode_steps
    max_len = n + steps
    prompt = ad.tokens(np.random.default_rng(1).integers(0, ctx.cfg.vocab_size, (B, n)))
    with ad.inference(), PeakMemory(ctx.device, ad.framework) as mem:
        cache = init_cache(B, max_len, kind)
        per_token = nbytes(cache) / (B * max_len) / ctx.cfg.num_hidden_layers
        t0 = time.perf_counter()
        chunk = min(n, ctx.args.prefill_chunk)
        for s in range(0, n, chunk):
            logits, cache = forward_cached(prompt[:, s:s + chunk], cache, s)
        ad.sync(logits)
        prefill_s = time.perf_counter() - t0  # includes compiling the chunk shape (JAX)
        tok = ad.next_token(logits)
        state = {"cache": cache, "calls": 0}

        def step():
            pos = n + state["calls"] % steps
            state["calls"] += 1
            out, state["cache"] = forward_cached(tok, state["cache"], pos)
            return out

        t = measure(step, ad.sync, warmup=ctx.warmup, reps=ctx.args.decode_reps)
    ctx.add("decode", name, ad.framework, t, tokens=B, mem=mem, kind=kind, context=n, batch=B,
            cache_bytes_per_token_per_layer=per_token,
            cache_values_per_token_per_layer=per_token / flops.DTYPE_BYTES[ctx.dtype],
            prefill_chunked_s=prefill_s, decode_flops_per_token=flops.decode_flops_per_token(ctx.cfg, n, kind))


# ---------------------------------------------------------------- MoE layer
def moe_inputs(ctx: Ctx) -> tuple[np.ndarray, tuple, np.ndarray]:
    """Activations [B, T, D], the dense SwiGLU's (w1 [D, W], w2 [W, D], w3 [D, W]), W the width of the
    same active FLOPs as the MoE layer, and the output gradient dy [B, T, D] of the forward + backward
    rows; fp32, seed 2.

    dy is random, as a training step's is: a plain sum's gradient is a broadcast of ones, and XLA:CPU ran
    the dense SwiGLU's first backward product on it 4.7 ms against 1.0 ms on a random gradient
    (docs/bench/README.md, "Measured choices in the code")."""
    D = ctx.cfg.hidden_size
    W = flops.moe_layer_flops_per_token(ctx.cfg)["dense_equivalent_width"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((ctx.batch, ctx.seq, D), dtype=np.float32)
    dense_w = tuple(rng.standard_normal(s, dtype=np.float32) * 0.02 for s in ((D, W), (W, D), (D, W)))
    return x, dense_w, rng.standard_normal(x.shape, dtype=np.float32)


def _moe_rows(ctx: Ctx, ad: Adapter) -> None:
    """The first MoE layer and the dense SwiGLU, forward alone and forward + backward."""
    fl = flops.moe_layer_flops_per_token(ctx.cfg)
    N = ctx.batch * ctx.seq
    pair = ad.moe_and_dense(*moe_inputs(ctx))
    for label, f_tok in (("moe", fl["total"]), ("dense", fl["experts"])):
        forward, fwd_bwd, extra = pair[label]
        with ad.inference():
            tf = measure(forward, ad.sync, warmup=ctx.warmup, reps=ctx.reps)
        tb = measure(fwd_bwd, ad.sync, warmup=ctx.warmup, reps=ctx.reps)
        for phase, t, f in (("forward", tf, N * f_tok), ("fwd+bwd", tb, 3 * N * f_tok)):
            ctx.add("moe", f"{ad.framework} {label} {phase}", ad.framework, t, tokens=N, model_flops=f,
                    kind=label, phase=phase, **extra)


# ----------------------------------------------------- speculative decoding
SPEC_PROMPT = 32  # prompt tokens per row
SPEC_MODES = (("greedy", {}), ("T0.8", {"temperature": 0.8, "seed": 0}))


def speculative_prompts(ctx: Ctx, batch: int) -> list[list[int]]:
    """``batch`` prompts of SPEC_PROMPT tokens: with --checkpoint, byte windows of the default corpus's
    validation text (what the trained MTP module drafts well or badly); else random tokens (seed 3)."""
    if getattr(ctx.args, "checkpoint", None):
        from dsv3.data import load_corpus

        val = load_corpus().val
        step = max(1, (len(val) - SPEC_PROMPT) // batch)
        return [[int(t) for t in val[i * step:i * step + SPEC_PROMPT]] for i in range(batch)]
    rng = np.random.default_rng(3)
    return rng.integers(0, ctx.cfg.vocab_size, (batch, SPEC_PROMPT)).tolist()


def _no_sync(_out) -> None:
    """generate returns host lists: nothing left to wait for."""


def _speculative_rows(ctx: Ctx, ad: Adapter) -> None:
    """Per batch and mode: plain decoding and MTP speculative decoding of the same prompts, each timed end to
    end (prefill included, after a first compiling call); the speed-up is their ratio in this run."""
    from dsv3.speculative import SpeculativeStats

    plain, spec = ad.generators()
    n = ctx.args.spec_new
    for B in ctx.args.spec_batches:
        prompts = speculative_prompts(ctx, B)
        for mode, kw in SPEC_MODES:
            name = f"{ad.framework} b{B} {mode}"

            def row():
                done = {}

                def run_plain():
                    done["plain"] = plain(prompts, n, **kw)

                with ad.inference():
                    t_plain = measure(run_plain, _no_sync, warmup=1, reps=ctx.reps)
                    st = SpeculativeStats()
                    out = spec(prompts, n, stats=st, **kw)  # compiles (JAX); its statistics and tokens
                    t_spec = measure(lambda: spec(prompts, n, **kw), _no_sync, warmup=0, reps=ctx.reps)
                same = out == done["plain"] if mode == "greedy" else None
                ctx.add("speculative", name, ad.framework, t_spec, tokens=st.tokens, batch=B, mode=mode,
                        new_tokens=n, plain_median_s=t_plain.median_s,
                        plain_tokens_per_s=st.tokens / t_plain.median_s, speedup=t_plain.median_s / t_spec.median_s,
                        acceptance_rate=st.acceptance_rate, mean_accepted_length=st.mean_accepted_length,
                        verify_calls=st.verify_calls, same_tokens_as_plain=same)

            ctx.guard("speculative", name, ad.framework, row, batch=B, mode=mode)


# ------------------------------------------------------------- long prompt
def long_prompt(ctx: Ctx) -> list[int]:
    """The long-prompt rows' prompt: ``--long-prompt`` random tokens (seed 4), the same for every framework."""
    return np.random.default_rng(4).integers(0, ctx.cfg.vocab_size, ctx.args.long_prompt).tolist()


def _long_row(ctx: Ctx, ad: Adapter) -> None:
    """Greedy generation of ``--long-new`` tokens after the long prompt, batch 1, end to end (the cached
    prefill of the prompt, then one token a call), timed after a first (compiling) call."""
    generate, prompt, n = ad.long_generator(), long_prompt(ctx), ctx.args.long_new
    out = {}

    def run():
        out["tokens"] = [int(t) for t in generate(prompt, n)]

    with ad.inference(), PeakMemory(ctx.device, ad.framework) as mem:
        t = measure(run, _no_sync, warmup=0, reps=ctx.reps)
    ctx.add("long", f"{ad.framework} prompt {len(prompt)} + {n}", ad.framework, t, tokens=n, mem=mem,
            prompt_tokens=len(prompt), new_tokens=n, out_tokens=out["tokens"])
