"""Compile time of the JAX training gradient, unrolled vs scanned layers (docs/scaling.md, "Scanned layers").

For a small-width config (the tiny preset's width, first_k_dense_replace=1, one MTP depth) at 8, 16 and 32
layers, measures the seconds of ``jax.jit(value_and_grad(compute_loss)).lower(...)`` and of ``.compile()``
with the layers unrolled (an nnx.List of Blocks) and scanned (two stacks under lax.scan). Each measurement
runs in its own process (no warm caches) with the persistent compilation cache off; the model is abstract
(DeepSeekV3.abstract: shapes only), so nothing but the trace, the lowering and XLA's compile is timed.

    PYTHONPATH=$PWD python docs/bench/scan_compile.py [--layers 8 16 32] [--batch 2 --seq 64] [--out table.md]
    PYTHONPATH=$PWD python docs/bench/scan_compile.py --size-only   # the lowered program's size, nothing timed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(layers: int, scan: bool, remat: str, batch: int, seq: int, size_only: bool = False) -> dict:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    from flax import nnx

    from dsv3.config import ModelConfig
    from dsv3_jax import DeepSeekV3

    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=layers, first_k_dense_replace=1,
                                             num_nextn_predict_layers=1)
    model = DeepSeekV3.abstract(cfg, scan_layers=scan, remat=remat)
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r, x, y):  # r: the rest of the state (router biases), abstract like p
        out = nnx.merge(gd, p, r).compute_loss(x, y)
        return out.loss, out.counts

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    t0 = time.perf_counter()
    lowered = f.lower(params, rest, ids, ids)
    t1 = time.perf_counter()
    hlo_lines = len(lowered.as_text().splitlines())  # the program's size: deterministic, unlike the seconds
    if size_only:
        return {"layers": layers, "scan": scan, "remat": remat, "hlo_lines": hlo_lines}
    lowered.compile()
    t2 = time.perf_counter()
    return {"layers": layers, "scan": scan, "remat": remat, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "total_s": t2 - t0, "hlo_lines": hlo_lines, "backend": jax.default_backend()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--size-only", action="store_true",
                    help="lower only (no compile, no seconds): the StableHLO line count per layout")
    ap.add_argument("--one", nargs=2, metavar=("LAYERS", "SCAN"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:  # a child process: one measurement, as JSON on stdout
        print(json.dumps(measure(int(a.one[0]), a.one[1] == "1", a.remat, a.batch, a.seq, a.size_only)))
        return 0
    if a.size_only:  # one process: lowering only, nothing timed
        lines = ["| layers | unrolled StableHLO lines | scanned StableHLO lines |", "|---:|---:|---:|"]
        for layers in a.layers:
            u, s = (measure(layers, scan, a.remat, a.batch, a.seq, True)["hlo_lines"] for scan in (False, True))
            lines.append(f"| {layers} | {u} | {s} |")
        print("\n".join(lines))
        return 0
    rows = []
    for layers in a.layers:
        for scan in (False, True):
            cmd = [sys.executable, __file__, "--one", str(layers), str(int(scan)), "--remat", a.remat,
                   "--batch", str(a.batch), "--seq", str(a.seq)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    by = {(r["layers"], r["scan"]): r for r in rows}
    lines = [f"value_and_grad(compute_loss), tiny width, first_k_dense_replace=1, 1 MTP depth, batch "
             f"{a.batch} x {a.seq}, remat {a.remat}, backend {rows[0]['backend']}; seconds (lower + compile)", "",
             "| layers | unrolled lower | unrolled compile | unrolled total | scanned lower | scanned compile "
             "| scanned total | unrolled / scanned |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layers in a.layers:
        u, s = by[(layers, False)], by[(layers, True)]
        lines.append(f"| {layers} | {u['lower_s']:.2f} | {u['compile_s']:.2f} | {u['total_s']:.2f} | "
                     f"{s['lower_s']:.2f} | {s['compile_s']:.2f} | {s['total_s']:.2f} | "
                     f"{u['total_s'] / s['total_s']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
