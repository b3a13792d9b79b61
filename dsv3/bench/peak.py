"""The machine's matmul peak, and each training step's matmul floor, measured per framework and dtype in
the same run.

The peak is the best throughput over a sweep of square and rectangular shapes,
each in both operand layouts the models use (A @ B and the Linear layout A @ W.T),
small cache-resident ones included (on a CPU a large square product is often
memory-bound and is *not* the peak). Each shape is timed like every other row
(first call apart, warm-up, median of several repetitions); the peak is the
best median throughput.

The floor of a training step is the time of its matmuls alone: every distinct
product of the step (``dsv3.flops.step_matmuls``: shape, batch and operand
layout, the layouts of how the framework stores a Linear's weight: torch
[out, in], Flax [in, out]) timed the same way on its own, times how often the
step computes it, summed. A step can only come near it by doing nothing but
those matmuls, each at the speed it reaches alone; a model whose matmuls are all
smaller than the peak's shapes has a floor well above FLOPs / peak. The time of
a 1×1×1 product (the framework's cost of one call) is taken off each product's
time: a compiled step does not pay it per product. JAX times each product as a
jitted loop of repeats (``rows_jax.JaxAdapter.matmul``), since XLA:CPU runs a
small product called on its own up to twice as slow as inside a compiled step;
its peak sweep likewise.
"""

from __future__ import annotations

from dataclasses import replace

from dsv3 import flops
from dsv3.bench.timing import Timing, call_s, measure

# (M, K, N): C[M, N] = A[M, K] @ B[K, N]
CPU_SHAPES = [
    (128, 128, 128), (256, 256, 256), (384, 384, 384), (512, 512, 512), (768, 768, 768),
    (1024, 1024, 1024), (1536, 1536, 1536), (2048, 2048, 2048),
    (2048, 256, 256), (2048, 256, 768), (2048, 768, 256), (2048, 256, 1024),
    (512, 256, 2048), (256, 2048, 256), (4096, 256, 640), (1024, 512, 512), (512, 1024, 512),
]
CPU_SHAPES_QUICK = [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 256, 768), (1024, 512, 512)]
GPU_SHAPES = [(n, n, n) for n in (1024, 2048, 4096, 8192, 16384)] + [
    (8192, 7168, 2048), (8192, 2048, 7168), (16384, 4096, 4096), (4096, 16384, 4096)]
GPU_SHAPES_QUICK = [(4096, 4096, 4096), (8192, 8192, 8192)]


def shapes_for(device: str, quick: bool) -> list[tuple[int, int, int]]:
    if device.startswith("cuda"):
        return GPU_SHAPES_QUICK if quick else GPU_SHAPES
    return CPU_SHAPES_QUICK if quick else CPU_SHAPES


def _reps_for(one_call_s: float, target_s: float, lo: int = 3, hi: int = 50) -> int:
    return int(max(lo, min(hi, target_s / max(one_call_s, 1e-6))))


def _time(fn, sync, target_s: float) -> Timing:
    """One product's timing: reps sized to about target_s after a first call and one warm-up. A call that
    repeats its product (``fn.products`` times, JAX's: ``rows_jax.JaxAdapter.matmul``) is timed whole and
    its times divided by that count."""
    one = (call_s(fn, sync) + call_s(fn, sync)) / 2
    t = measure(fn, sync, warmup=1, reps=_reps_for(one, target_s))
    n = getattr(fn, "products", 1)
    if n == 1:
        return t
    per = lambda v: v / n  # noqa: E731
    return replace(t, first_s=per(t.first_s), median_s=per(t.median_s), p25_s=per(t.p25_s), p75_s=per(t.p75_s),
                   min_s=per(t.min_s), max_s=per(t.max_s), times_s=[per(v) for v in t.times_s],
                   warmup_s=[per(v) for v in t.warmup_s])


def _sweep(make_fn, sync, shapes, target_s: float) -> dict:
    """make_fn(M, K, N) -> {layout: fn}: each shape in each operand layout the models use
    ("nn": A @ B; "nt": A @ W.T, the nn.Linear / F.linear layout)."""
    rows = []
    for (M, K, N) in shapes:
        for layout, fn in make_fn(M, K, N).items():
            t = _time(fn, sync, target_s)
            gflops = 2.0 * M * K * N / t.median_s / 1e9
            rows.append({"shape": [M, K, N], "layout": layout, "median_s": t.median_s, "iqr_rel": t.iqr_rel,
                         "reps": t.reps, "gflops": gflops})
    best = max(rows, key=lambda r: r["gflops"])
    return {"peak_gflops": best["gflops"], "peak_shape": best["shape"], "peak_layout": best["layout"],
            "sweep": rows}


def measure_peak(ad, quick: bool) -> dict:
    """The sweep with one framework's adapter (``rows.Adapter.matmuls``)."""
    ctx = ad.ctx
    with ad.scope(), ad.inference():
        out = _sweep(ad.matmuls, ad.sync, shapes_for(ctx.device, quick), 0.15 if quick else 0.4)
    out.update(framework=ad.peak_key, dtype=ad.dtype_name, **ad.peak_info())
    return out


def measure_floor(ad, cfg, batch: int, seq: int, mtps, quick: bool) -> dict:
    """The matmul floor of the training step with MTP on and/or off (``mtps``), for one framework's adapter:
    {"floor_s": {"on" | "off": seconds}, "call_overhead_s": a 1×1×1 product's time, "matmuls": [each distinct
    product: shape, layout, what, how often per step with MTP on and off, its median seconds alone, GFLOP/s,
    and ``net_s``, that time less the call overhead]}; the floor sums each product's ``net_s``."""
    per = {("on" if m else "off"): flops.step_matmuls(cfg, batch, seq, mtp=m, kernels=ad.kernels) for m in mtps}
    table: dict[tuple, dict] = {}
    for key, mms in per.items():
        for mm in mms:
            e = table.setdefault(mm.shape, {"b": mm.b, "m": mm.m, "k": mm.k, "n": mm.n, "layout": mm.layout,
                                            "what": mm.what, "count": {}})
            e["count"][key] = mm.count
    target_s = 0.05 if quick else 0.2
    with ad.scope(), ad.inference():
        # what a call costs besides its product (dispatch, synchronisation): a compiled step does not pay it
        # per product, so each product's time alone is counted less this
        overhead = _time(ad.matmul(1, 1, 1, 1, "nn"), ad.sync, target_s).median_s
        for (b, M, K, N, layout), e in table.items():
            t = _time(ad.matmul(b, M, K, N, layout), ad.sync, target_s)
            e.update(median_s=t.median_s, iqr_rel=t.iqr_rel, reps=t.reps, gflops=2.0 * b * M * K * N / t.median_s / 1e9,
                     net_s=max(0.0, t.median_s - overhead))
    floor = {key: sum(e["count"].get(key, 0.0) * e["net_s"] for e in table.values()) for key in per}
    return {"framework": ad.peak_key, "dtype": ad.dtype_name, "floor_s": floor, "call_overhead_s": overhead,
            "matmuls": list(table.values())}
