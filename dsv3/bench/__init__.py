"""``dsv3 bench``: the two frameworks (and Hugging Face transformers as the
reference) on the same config, the same weights and the same batch.

Rows: training step (torch eager, torch.compile, JAX jit; MTP on and off; HF
eager attention with each experts backend; with ``--bf16-rows`` torch eager,
torch.compile and JAX jit in bf16 too), prefill forward, decoding tokens/s
at several context lengths with the absorbed latent cache and the naive
expanded cache, and the MoE layer alone against a dense SwiGLU of the same
active FLOPs. Utilisation is model FLOPs (``dsv3/flops.py``) over the matmul
peak measured in the same run, per framework and dtype; each training row also
stands against its step's matmul floor (``peak.measure_floor``: the step's own
matmuls in the framework's operand layouts, each timed alone).

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``. Targets
are reported with pass/miss, never asserted. Heavy imports (torch, jax,
transformers) happen inside ``run``; ``python -m dsv3.bench`` also works.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SECTIONS = ("peak", "floor", "train", "compile", "hf", "prefill", "decode", "moe", "speculative", "long")
FRAMEWORKS = ("torch", "jax")
DECODE_STEPS = 8  # one-token steps timed per decoding row (the cache holds context + these)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None,
                   help="config preset (tiny, small, ...); default: small, the peer-small comparison shape")
    g.add_argument("--config", default=None, help="a HF-style config.json (or a checkpoint directory)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="default: cuda when torch finds a GPU, else cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and contexts, torch.compile only with MTP on")
    parser.add_argument("--out", default="bench-results", help="output directory (bench.json, bench.md, bench.png)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--contexts", default=None,
                        help="decode context lengths, comma separated (default 256,1024,4096; --quick 256,1024)")
    parser.add_argument("--decode-batch", type=int, default=None, help="decode batch (default: --batch)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 2; --quick 1)")
    parser.add_argument("--decode-reps", type=int, default=None, help="timed decode steps (default 20; --quick 8)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="chunk length when filling decode caches")
    parser.add_argument("--mtp", default="both", choices=["both", "on", "off"],
                        help="train rows with MTP on, off or both (default both)")
    parser.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    parser.add_argument("--frameworks", default="torch,jax", help="comma list: torch,jax")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--omp-wait-policy", default=None, choices=["passive", "active"],
                        help="set OMP_WAIT_POLICY for torch's OpenMP pool before torch loads (passive: "
                             "idle threads sleep; on a loaded, oversubscribed CPU spinning threads stall "
                             "every small op). Default: leave the environment alone")
    parser.add_argument("--checkpoint", default=None,
                        help="a trained checkpoint (or run directory: its latest): config and weights of every "
                             "row instead of random weights; speculative rows then draft from its MTP module "
                             "and prompt with the default corpus's validation text")
    parser.add_argument("--spec-batches", default="1,8", help="batches of the speculative-decoding rows")
    parser.add_argument("--spec-new", type=int, default=None,
                        help="tokens generated per speculative-decoding row (default 64; --quick 16)")
    parser.add_argument("--long-prompt", type=int, default=4096,
                        help="prompt tokens of the long-prompt rows (generation end to end, batch 1, greedy; "
                             "clipped to the model's positions)")
    parser.add_argument("--long-new", type=int, default=64, help="tokens generated after the long prompt")
    parser.add_argument("--bf16-rows", action="store_true",
                        help="with --dtype fp32: also torch eager, torch.compile (unless skipped) and JAX jit training steps in bf16 (bf16 "
                             "compute, fp32 master weights), MTP off, against their own bf16 matmul peak and floor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-foreach", action="store_true",
                        help="HF rows: foreach AdamW (default: fused, as dsv3_torch.train)")


def _config(args):
    from dsv3.config import ModelConfig

    if getattr(args, "checkpoint", None):  # (dsv3.bench.profile's arguments have no --checkpoint)
        from dsv3.rundir import resolve_weights_dir

        cfg = ModelConfig.from_pretrained(resolve_weights_dir(args.checkpoint))
        name = os.path.basename(os.path.normpath(args.checkpoint))
    elif args.config:
        cfg = ModelConfig.from_pretrained(args.config)
        name = os.path.basename(os.path.normpath(args.config)).removesuffix(".json")
    else:
        name = args.preset or "small"
        cfg = ModelConfig.preset(name)
    return cfg, name


def _is_peer_small(cfg) -> bool:
    """The peer-small comparison shape (the ``small`` preset is exactly it)."""
    from dsv3.config import ModelConfig

    return cfg == ModelConfig.preset("small")


def random_state(cfg, seed: int) -> dict:
    """Canonical weights with HF's initialisation (docs/reference.md §5): N(0, 0.02)
    for linear, embedding and router weights, 1 for norms, 0 for router biases."""
    import numpy as np

    from dsv3.names import canonical_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in canonical_shapes(cfg).items():
        if name.endswith("gate.bias"):
            out[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * cfg.initializer_range).astype(np.float32)
    return out


def set_work(ctx, seed: int) -> None:
    """The bench's weights and batch on ctx: random_state(seed) (or --checkpoint's weights) and tokens
    [B, T + 1] from seed + 1."""
    import numpy as np

    if getattr(ctx.args, "checkpoint", None):
        from dsv3.checkpoint import load_canonical
        from dsv3.rundir import resolve_weights_dir

        _, state = load_canonical(resolve_weights_dir(ctx.args.checkpoint), ctx.cfg)
        ctx.state = {k: np.asarray(v, np.float32) for k, v in state.items()}  # the bench casts per row
    else:
        ctx.state = random_state(ctx.cfg, seed)
    rng = np.random.default_rng(seed + 1)
    ctx.tokens = rng.integers(0, ctx.cfg.vocab_size, (ctx.batch, ctx.seq + 1)).astype(np.int32)


def _contexts(args, cfg, steps: int) -> list[int]:
    if args.contexts:
        want = [int(x) for x in args.contexts.split(",") if x.strip()]
    else:
        want = [256, 1024] if args.quick else [256, 1024, 4096]
    limit = cfg.max_position_embeddings - steps
    out = sorted({min(n, limit) for n in want if min(n, limit) > 0})
    return out


def _git() -> dict:
    """The commit measured, and whether the working tree differed from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head or None, "dirty": bool(dirty)} if head else {}


def _versions() -> dict:
    v = {}
    for mod in ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            v[mod] = None
    return v


class _Usage(Exception):
    """A command line the bench refuses (exit status 2)."""


def run(args) -> int:
    from dsv3.bench import report

    try:
        cfg, name, frameworks = _parse(args)
        inductor_cache = _start_torch(args)  # noqa: F841 - removed when run returns
    except _Usage as e:
        print(f"dsv3 bench: {e}", file=sys.stderr)
        return 2
    ctx, env = _make_ctx(args, cfg)
    t_start = time.perf_counter()
    ctx.log(f"dsv3 bench: {name}, {args.device} {args.dtype}, batch {args.batch} x seq {args.seq}, "
            f"torch threads {_torch_threads()}, load {env['loadavg_start']}")
    peaks = _peaks(ctx, frameworks, args.skip, "start") if "peak" not in args.skip else {}
    ctx.peaks = {k: v["peak_gflops"] for k, v in peaks.items()}  # Ctx.add reads GFLOP/s per framework
    if "floor" not in args.skip and "train" not in args.skip:
        ctx.floors = _floors(ctx, frameworks, args.skip)  # the train rows read their floor
    _run_rows(ctx, frameworks, args.skip)
    if "peak" not in args.skip and not args.quick:
        _end_peaks(ctx, peaks, frameworks, args.skip)
    res = _results(ctx, name, frameworks, env, peaks, round(time.perf_counter() - t_start, 1))
    res["targets"] = report.evaluate_targets(res)
    paths = report.write_all(res, args.out)
    print()
    print(report.markdown(res))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']} in {res['meta']['wall_s']} s")
    return 0


def _parse(args):
    """Checks the command line and fills the defaults; (config, its name, frameworks)."""
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        raise _Usage(f"unknown --skip sections {sorted(skip - set(SECTIONS))}; choose from {SECTIONS}")
    args.skip = skip
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if set(frameworks) - set(FRAMEWORKS):
        raise _Usage(f"--frameworks must be among {FRAMEWORKS}")
    cfg, name = _config(args)
    if args.seq > cfg.max_position_embeddings:
        raise _Usage(f"--seq {args.seq} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    q = args.quick
    args.reps = args.reps or (3 if q else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.decode_reps = args.decode_reps or (8 if q else 20)
    args.spec_new = args.spec_new or (16 if q else 64)
    try:
        args.spec_batches = [int(b) for b in str(args.spec_batches).split(",") if b.strip()]
    except ValueError:
        raise _Usage(f"--spec-batches must be a comma list of batch sizes (got {args.spec_batches!r})") from None
    if args.long_new < 1 or args.long_prompt < 1:
        raise _Usage("--long-prompt and --long-new must be positive")
    args.long_prompt = min(args.long_prompt, cfg.max_position_embeddings - args.long_new)
    if args.long_prompt < 1:
        raise _Usage(f"--long-new {args.long_new} leaves no room for a prompt within "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
    if args.checkpoint and args.config:
        raise _Usage("--checkpoint holds its own config: leave out --config")
    return cfg, name, frameworks


def _start_torch(args):
    """Process settings read when torch starts, then torch and the device; returns the private
    inductor cache directory (empty: torch.compile's first-call time is then honest, with no kernels
    reused from earlier runs, and concurrent compiles elsewhere cannot corrupt it)."""
    import tempfile

    from dsv3 import runtime

    runtime.configure()  # no-op when the dsv3 command already did it
    if args.omp_wait_policy:
        if "torch" in sys.modules:
            print("dsv3 bench: torch is already loaded; --omp-wait-policy has no effect", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    inductor_cache = tempfile.TemporaryDirectory(prefix="dsv3-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:  # the device it finds
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Usage("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda":
        os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")  # read when jax first starts its backends
    return inductor_cache


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _make_ctx(args, cfg):
    """The run's Ctx (weights and batch from --seed) and the environment record."""
    from dsv3 import runtime
    from dsv3.bench.common import Ctx
    from dsv3.bench.timing import environment

    env = environment(args.device)
    settings = runtime.configure()
    env["malloc"], env["GLIBC_TUNABLES"] = settings["malloc"], settings["GLIBC_TUNABLES"]
    env["jax_sync_dispatch"] = settings["jax_sync_dispatch"]
    env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper() if args.omp_wait_policy else os.environ.get("OMP_WAIT_POLICY")
    ctx = Ctx(args=args, cfg=cfg, device=args.device, dtype=args.dtype, batch=args.batch, seq=args.seq,
              contexts=_contexts(args, cfg, DECODE_STEPS), decode_batch=args.decode_batch or args.batch,
              decode_steps=DECODE_STEPS, warmup=args.warmup, reps=args.reps,
              extra_dtypes=["bf16"] if args.bf16_rows and args.dtype != "bf16" else [])
    ctx.log = lambda s: print(s, flush=True)
    set_work(ctx, args.seed)
    return ctx, env


def _adapter(ctx, framework: str, dtype=None):
    """The framework's adapter; ``dtype`` (for the peak and floor of --bf16-rows) instead of the run's."""
    if framework == "jax":
        from dsv3.bench.rows_jax import JaxAdapter

        return JaxAdapter(ctx, dtype)
    if framework == "hf":
        from dsv3.bench.rows_hf import HFAdapter

        return HFAdapter(ctx)
    from dsv3.bench.rows_torch import TorchAdapter

    return TorchAdapter(ctx, dtype)


def _run_rows(ctx, frameworks, skip) -> None:
    """Every row: torch, then JAX, then the Hugging Face reference (training step, prefill, long prompt)."""
    from dsv3.bench import rows, rows_hf

    sections = [s for s in ("train", "prefill", "decode", "moe", "speculative", "long") if s not in skip]
    for fw in (f for f in FRAMEWORKS if f in frameworks):
        ctx.log(fw)
        rows.run_rows(ctx, _adapter(ctx, fw), sections)
    if "hf" not in skip:
        ctx.log("Hugging Face transformers (reference)")
        if not rows_hf.available():
            ctx.log("  transformers not installed: no HF reference rows")
            return
        rows.run_rows(ctx, _adapter(ctx, "hf"), [s for s in sections if s in ("train", "prefill", "long")])


def _end_peaks(ctx, peaks, frameworks, skip) -> None:
    """The sweep again at the end: on a shared machine the peak drifts with the load.
    MFU uses the higher of the two (the conservative utilisation)."""
    from dsv3.bench.common import framework_peak_key

    for fw, v in _peaks(ctx, frameworks, skip, "end").items():
        if fw not in peaks:
            continue
        p = peaks[fw]
        p["peak_gflops_end"], p["peak_gflops_start"] = v["peak_gflops"], p["peak_gflops"]
        best = max(v["peak_gflops"], p["peak_gflops"])
        if best > ctx.peaks[fw]:
            for r in ctx.rows:
                if r.get("mfu") is not None and framework_peak_key(r["framework"], r.get("dtype")) == fw:
                    r["mfu"] = r["gflops"] / best
        p["peak_gflops"] = best


def _results(ctx, name, frameworks, env, peaks, wall_s) -> dict:
    from dsv3 import flops
    from dsv3.bench.timing import loadavg

    args, cfg = ctx.args, ctx.cfg
    meta = {
        "config_name": name, "config": cfg.to_hf_dict(), "is_peer_small_shape": _is_peer_small(cfg),
        "device": args.device, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
        "quick": args.quick, "contexts": ctx.contexts, "decode_batch": ctx.decode_batch,
        "decode_steps": ctx.decode_steps, "reps": args.reps, "warmup": args.warmup,
        "decode_reps": args.decode_reps, "seed": args.seed, "frameworks": frameworks,
        "checkpoint": args.checkpoint, "spec_batches": args.spec_batches, "spec_new": args.spec_new,
        "long_prompt": args.long_prompt, "long_new": args.long_new, "extra_dtypes": ctx.extra_dtypes,
        "skip": sorted(args.skip), "torch_threads": _torch_threads(),
        "mtp_depths": cfg.num_nextn_predict_layers, "layers": cfg.num_hidden_layers,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "env": env, "versions": _versions(), "git": _git(), "loadavg_end": loadavg(), "wall_s": wall_s,
    }
    return {"meta": meta, "flops": flops.summary(cfg, args.seq, args.batch, dtype=args.dtype),
            "peaks": peaks, "floors": ctx.floors, "rows": ctx.rows}


def _matmul_adapters(ctx, frameworks, skip):
    """(key, adapter) of each framework and dtype whose matmuls are measured: torch (also when only the HF
    rows use it) and JAX in the run's dtype, and with --bf16-rows the same in bf16 ("torch bf16")."""
    dtypes = [None] + (["bf16"] if ctx.extra_dtypes else [])
    for fw in FRAMEWORKS:
        if fw in frameworks or (fw == "torch" and "hf" not in skip):
            for dt in dtypes:
                ad = _adapter(ctx, fw, dt)
                yield ad.peak_key, ad


def _peaks(ctx, frameworks, skip, when: str) -> dict:
    """The matmul peak of each framework and dtype."""
    from dsv3.bench import peak

    out = {}
    for key, ad in _matmul_adapters(ctx, frameworks, skip):
        ctx.log(f"matmul peak sweep ({when}): {ad.framework} {ad.dtype_name}")
        try:
            out[key] = peak.measure_peak(ad, ctx.args.quick)
            ctx.log(f"  {key}: {out[key]['peak_gflops']:.1f} GFLOP/s at {out[key]['peak_shape']}")
        except Exception as e:  # noqa: BLE001 - reported
            ctx.log(f"  {key} peak failed: {e}")
    return out


def _floors(ctx, frameworks, skip) -> dict:
    """The training step's matmul floor per framework and dtype (torch's also serves the HF rows), MTP on and
    off (the extra dtype's rows: off)."""
    from dsv3.bench import peak

    out = {}
    for key, ad in _matmul_adapters(ctx, frameworks, skip):
        mtps = [True, False] if ctx.has_mtp and ad.dtype_name == ctx.dtype else [False]
        ctx.log(f"matmul floor of the training step: {ad.framework} {ad.dtype_name}")
        try:
            out[key] = f = peak.measure_floor(ad, ctx.cfg, ctx.batch, ctx.seq, mtps, ctx.args.quick)
            ctx.log("  " + ", ".join(f"MTP {k} {v * 1e3:.1f} ms" for k, v in f["floor_s"].items())
                    + f" ({len(f['matmuls'])} distinct matmuls)")
        except Exception as e:  # noqa: BLE001 - reported
            ctx.log(f"  {key} floor failed: {e}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3 bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
