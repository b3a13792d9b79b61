"""Where a training step's time goes: ``python -m dsv3.bench.profile``.

Profiles the same training step ``dsv3 bench`` times (the training backend's
``train_step`` on the bench's weights and batch) and prints a table:

* torch: ``torch.profiler`` self CPU time per ATen op (and oneDNN product, autograd node), per step;
* jax: ``jax.profiler`` time per XLA:CPU kernel, per step (each kernel's median call
  duration times its calls, so one call delayed by the load does not count in full),
  grouped by the model component its HLO metadata names (the jitted step is dumped to a temporary
  directory to read that metadata; XLA_FLAGS is set before JAX starts, so run
  this as its own process).

Kernel times can add up to more than the step: XLA:CPU runs independent
kernels on both cores at once, and the profiler itself slows the step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

# The model component an HLO op belongs to, from its opcode and the jax op names in its
# metadata (einsum specs, function names). First match wins.
MOE_KEYS = ("gmd", "gmf", "gdf", "gfd", "searchsorted", "sort", "scatter", "/gather", "bincount", "cumsum")
ATTN_KEYS = ("bshd", "bhst", "bthd", "bthv", "bshv", "softmax")
ELEMENTWISE = (
    ("RoPE and q/k assembly", ("concatenate", "/slice", "/cos", "/sin")),
    ("SiLU / SwiGLU elementwise", ("silu", "logistic")),
    ("RMSNorm", ("rsqrt", "square")),
    ("optimizer (AdamW, clipping)", ("optax", "adam", "clip", "sqrt")),
)


def _setup(args):
    from dsv3 import runtime

    runtime.configure()
    if args.framework == "jax":
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={args.dump}",
                                            "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=.*train_step.*"])
        # The table needs the step compiled here: a hit in a persistent compilation cache
        # (JAX_COMPILATION_CACHE_DIR; the dump flags are not part of its key) would skip the
        # compile and its HLO dump, and leave every kernel unattributed.
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"


def _backend_step(args):
    """(step, description) of the bench's training step for this framework."""
    from dsv3.bench import _config, set_work
    from dsv3.bench.common import Ctx, backend_train_step

    cfg, name = _config(args)
    ctx = Ctx(args=args, cfg=cfg, device="cpu", dtype=args.dtype, batch=args.batch, seq=args.seq, contexts=[],
              decode_batch=args.batch, decode_steps=0, warmup=0, reps=0)
    set_work(ctx, seed=0)  # dsv3 bench's default --seed: the same weights and batch
    step, desc = backend_train_step(ctx, args.framework, mtp=args.mtp)
    return step, (f"{name}, {args.dtype}, batch {args.batch} x seq {args.seq}, MTP {'on' if args.mtp else 'off'}: "
                  f"{desc}")


def profile_torch(step, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    # ATen's ops, oneDNN's products (``dsv3_torch.cpu_matmul``), autograd nodes and the optimizer
    avg = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "Optimizer"))
           or "Backward" in e.key]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1e3
    avg.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f"self CPU time per step: {total:.1f} ms", "", "| op | ms / step | calls / step |", "|---|--:|--:|"]
    for e in avg[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / steps / 1e3:.1f} | {e.count // steps} |")
    return "\n".join(lines)


def _hlo_metadata(dump: str) -> dict[str, tuple[str, str, str]]:
    """op name -> (shape, opcode, jax op_name) from the optimised HLO of the jitted train step."""
    files = sorted(glob.glob(os.path.join(dump, "*train_step*cpu_after_optimizations.txt")))
    if not files:
        return {}
    meta = {}
    for line in open(files[-1]):
        # the shape is one array type or a tuple of them (a sort's keys and values, TopK's values and indices)
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\(.*?op_name="([^"]*)"', line)
        if m and m.group(1) not in meta:
            meta[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return meta


def component(opcode: str, op_name: str) -> str:
    dot = opcode == "dot"
    if "expert_loop" in op_name:  # dsv3_jax.moe's expert loop: its matmuls, and its slices, SwiGLU and updates
        return "MoE: expert matmuls" if dot else "MoE: expert loop slices, SwiGLU, updates"
    if any(k in op_name for k in MOE_KEYS):
        return "MoE: expert matmuls" if dot else "MoE: dispatch, gathers, combine"
    if any(k in op_name for k in ATTN_KEYS):
        return "attention: score and value matmuls" if dot else "attention: mask, softmax"
    if dot:
        return "projection / MLP / head matmuls"
    for label, keys in ELEMENTWISE:
        if any(k in op_name for k in keys):
            return label
    return "other elementwise / layout"


def profile_jax(step, steps: int, rows: int, dump: str) -> str:
    import jax

    with tempfile.TemporaryDirectory(prefix="dsv3-jax-trace-") as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    meta = _hlo_metadata(dump)
    calls: dict = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("args", {}).get("hlo_module", "").endswith("train_step"):
            if e["name"] in meta and meta[e["name"]][1] == "while":
                continue  # a loop's time is that of its body's kernels, which have their own events
            calls[e["name"]].append(e["dur"])
    # each kernel at its median call times its calls: a call the OS delayed (the other core busy)
    # counts at the kernel's typical duration instead of adding the delay to its component
    per_op = collections.Counter({op: statistics.median(d) * len(d) for op, d in calls.items()})
    by_comp: collections.Counter = collections.Counter()
    for op, us in per_op.items():
        by_comp[component(*meta[op][1:]) if op in meta else "unattributed (no HLO metadata)"] += us
    total = sum(per_op.values()) / steps / 1e3
    lines = [f"XLA:CPU kernel time per step: {total:.1f} ms", "",
             "| component (from HLO metadata) | ms / step | share |", "|---|--:|--:|"]
    for comp, us in by_comp.most_common():
        lines.append(f"| {comp} | {us / steps / 1e3:.1f} | {us / sum(by_comp.values()):.0%} |")
    lines += ["", "| kernel | shape | ms / step | jax op |", "|---|---|--:|---|"]
    for op, us in per_op.most_common(rows):
        shape, _, name = meta.get(op, ("", "", ""))
        lines.append(f"| `{op}` | `{shape}` | {us / steps / 1e3:.1f} | `{name.split('/')[-1]}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:  # as the dsv3 command: restart once with huge pages for malloc (dsv3.runtime)
        from dsv3 import runtime

        runtime.restart_with_hugepages()
    p = argparse.ArgumentParser(prog="python -m dsv3.bench.profile", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None)
    g.add_argument("--config", default=None, help="a HF-style config.json")
    p.add_argument("--framework", choices=("torch", "jax"), required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mtp", action="store_true", help="profile with MTP on (default off, like the HF reference)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the step's compute dtype (bf16: the backends' bf16 mode, fp32 master weights)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=20)
    args = p.parse_args(argv)
    if "jax" in sys.modules and args.framework == "jax":
        print("profile: jax is already imported; run as its own process", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dsv3-hlo-") as dump:
        args.dump = dump
        _setup(args)
        step, desc = _backend_step(args)
        for _ in range(3):
            step()
        table = (profile_torch(step, args.steps, args.rows) if args.framework == "torch"
                 else profile_jax(step, args.steps, args.rows, dump))
    print(f"### {args.framework} training step profile\n\n{desc}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
