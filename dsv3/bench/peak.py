"""The machine's matmul peak, measured per framework and dtype in the same run.

The peak is the best throughput over a sweep of square and rectangular shapes,
each in both operand layouts the models use (A @ B and the Linear layout A @ W.T),
small cache-resident ones included (on a CPU a large square product is often
memory-bound and is *not* the peak). Each shape is timed like every other row
(first call apart, warm-up, median of several repetitions); the peak is the
best median throughput.
"""

from __future__ import annotations

from dsv3.bench.timing import call_s, measure

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


def _sweep(make_fn, sync, shapes, target_s: float) -> dict:
    """make_fn(M, K, N) -> {layout: fn}: each shape in each operand layout the models use
    ("nn": A @ B; "nt": A @ W.T, the nn.Linear / F.linear layout)."""
    rows = []
    for (M, K, N) in shapes:
        for layout, fn in make_fn(M, K, N).items():
            one = (call_s(fn, sync) + call_s(fn, sync)) / 2
            t = measure(fn, sync, warmup=1, reps=_reps_for(one, target_s))
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
    out.update(framework=ad.peak_key, dtype=ctx.dtype, **ad.peak_info())
    return out
