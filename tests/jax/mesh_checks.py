"""Every multi-device check, in ONE process with 8 simulated CPU devices (run by tests/jax/test_sharding.py).

The test session's JAX already runs with one device, so these checks live in a script that asks for
8 devices before jax starts -- through the command line under test, ``dsv3 train --cpu-devices 8``,
which is its first action. Prints one JSON object as the last line of stdout.

    python tests/jax/mesh_checks.py            # from the repository root, PYTHONPATH=.

Checks (shapes tiny; compiled functions shared where possible):
  cli       `dsv3 train --cpu-devices 8 --mesh data=2,fsdp=2,expert=2` runs 2 steps
  train     per mesh: 20 steps from the same weights and batches vs the single-device run
            (loss per step, router biases, parameters after 20 steps)
  bytes     per-device parameter + optimizer bytes from the arrays' addressable shards vs the
            plan of dsv3_jax.sharding (abstract model, same rules)
  ep        expert-parallel MoE layer vs the single-device layer under skewed routing
  scan      scanned layers (a dense and a MoE stack) on data=2,fsdp=2,expert=2, expert parallelism
            inside the scan, vs the unrolled model on one device
  hlo       per-kind collective bytes of the compiled fsdp=8 and expert=8 steps (dsv3_jax.hlo) and
            the formula of docs/scaling.md section 4
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

assert "jax" not in sys.modules
# The compile settings of the root conftest (a test session's subprocesses inherit them; set here too
# for a run of this script on its own): faster to compile, the same programme; see the root conftest.
for _flag in ("--xla_allow_excess_precision=false", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as the root conftest; read when jax starts
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # GSPMD's "involuntary rematerialization" warnings

import numpy as np  # noqa: E402

from dsv3 import cli  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared workload
from scale_workload import (CFG, CLI_STEPS, LR, TRAIN_KW, batches, cli_args, initial_state,  # noqa: E402
                            write_cli_inputs)

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "expert=8")


def run_cli(tmp: str) -> dict:
    cfg_dir, text = os.path.join(tmp, "cfg"), os.path.join(tmp, "corpus.txt")
    write_cli_inputs(cfg_dir, text)
    out = os.path.join(tmp, "run")
    rc = [cli.main(cli_args(cfg_dir, text, out))]
    import jax

    assert jax.config.jax_default_matmul_precision == "highest"
    from dsv3.training import read_metrics

    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    # --resume of the sharded run from its step-2 checkpoint (orbax/ onto the same mesh): the same records
    resumed = os.path.join(tmp, "resumed")
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns(".lock", f"step_{CLI_STEPS:06d}"))
    with open(os.path.join(resumed, "latest"), "w") as f:  # as if the run had stopped after step 2
        f.write("step_000002\n")
    rc.append(cli.main(cli_args(cfg_dir, text, resumed) + ["--resume"]))
    again = read_metrics(os.path.join(resumed, "metrics.jsonl"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    ckpt = os.path.join(out, f"step_{CLI_STEPS:06d}")
    return {"rc": rc, "devices": len(jax.devices()), "train_records": sum(r["kind"] == "train" for r in recs),
            "eval_records": sum(r["kind"] == "eval" for r in recs),
            "losses": [r["loss"] for r in recs if r["kind"] == "train"],
            "resumed_equal": strip(again) == strip(recs), "resumed_records": len(again),
            "checkpoint_files": sorted(os.listdir(ckpt))}


TIMING_KEYS = ("time", "wall_s", "tokens_per_s", "step_s", "elapsed_s")


def train_checks() -> dict:
    from flax import nnx

    from dsv3.training import TrainConfig
    from dsv3_jax import sharding
    from dsv3_jax.model import DeepSeekV3
    from dsv3_jax.train import JaxBackend, make_tx

    tcfg = TrainConfig(**TRAIN_KW, progress=False, plots=False)
    data = batches()
    ref = JaxBackend(CFG, tcfg)
    init = initial_state()
    ref.load_canonical_state(init)
    ref_loss = [ref.train_step(b, LR)["loss"] for b in data]
    ref_state = ref.canonical_state()
    abstract = DeepSeekV3.abstract(CFG)
    abstract_opt = nnx.eval_shape(lambda m: nnx.Optimizer(m, make_tx(tcfg), wrt=nnx.Param), abstract)
    single = sharding.planned_bytes(abstract, abstract_opt, {})
    out = {"ref_loss": ref_loss, "single_device_bytes": single["total"], "meshes": {}}
    for mesh in MESHES:
        t0, c0 = time.perf_counter(), time.process_time()
        be = JaxBackend(CFG, tcfg, mesh=sharding.make_mesh(mesh))
        be.load_canonical_state(init)
        measured = sharding.measured_bytes((nnx.state(be.model), nnx.state(be.optimizer)))
        plan = sharding.planned_bytes(abstract, abstract_opt, mesh)
        losses = [be.train_step(b, LR)["loss"] for b in data]
        if mesh == ORBAX_SAVE:
            out["orbax"] = orbax_checks(be, tcfg)
        if mesh in HLO_MESHES:
            out.setdefault("collectives", {})[mesh] = collective_checks(be, data[0], mesh)
        st = _host_canonical_state(be, ref)
        shardings = {str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(nnx.state(be.model, nnx.Param))}
        out["meshes"][mesh] = {
            "loss": losses,
            **_against_reference(losses, st, ref_loss, ref_state, init),
            "measured_bytes": sorted(set(measured.values())), "devices_with_state": len(measured),
            "planned_bytes": plan["total"],
            "specs": sorted(shardings),
            "still_sharded": _still_sharded(be),
            "dispatcher": type(be.model.moe_layers()[0].dispatcher).__name__,
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
        }
        del be
    return out


ORBAX_SAVE, ORBAX_RESTORE = "fsdp=8", "data=2,fsdp=2,expert=2"
HLO_MESHES = ("fsdp=8", "expert=8")


def collective_checks(be, micro_batches, mesh: str) -> dict:
    """The collectives of the step just run (its compiled program: the same lowering hits jax's
    in-memory caches), counted by dsv3_jax.hlo, next to the formula of docs/scaling.md section 4."""
    from scale_workload import ACCUM, BATCH, SEQ

    from dsv3_jax import hlo, sharding

    counted = hlo.count_collectives(be.lower_train_step(micro_batches, LR).compile())
    sizes = sharding.parse_mesh(mesh)
    formula = hlo.analytic_bytes(CFG, sizes, grad_accum=ACCUM,
                                 tokens_per_micro_batch=BATCH // ACCUM * SEQ // sharding.mesh_size(sizes))
    return {"hlo": counted, "formula": formula}


def orbax_checks(be, tcfg) -> dict:
    """The trained fsdp=8 state saved with orbax (each shard by its device), restored onto
    data=2,fsdp=2,expert=2 and onto one device: model and AdamW state bit for bit."""
    import jax
    from flax import nnx

    from dsv3_jax import sharding
    from dsv3_jax.dist_checkpoint import load_sharded, save_sharded
    from dsv3_jax.train import JaxBackend

    def host(b):
        return [np.asarray(x) for x in jax.device_get(jax.tree.leaves((nnx.state(b.model), nnx.state(b.optimizer))))]

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "orbax")
        save_sharded(path, be.model, be.optimizer)
        want = host(be)
        for spec in (ORBAX_RESTORE, None):
            other = JaxBackend(CFG, tcfg, mesh=None if spec is None else sharding.make_mesh(spec))
            load_sharded(path, other.model, other.optimizer)
            got = host(other)
            res[spec or "one device"] = {
                "bit_exact": len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want)),
                "devices": sorted({len(v.get_value().sharding.device_set)
                                   for _, v in nnx.to_flat_state(nnx.state(other.model))})}
    return res


# (impl, mesh): the three grouped-matmul paths, three expert layouts; each pair is one compile.
EP_CASES = (("loop", "expert=8"), ("blocksparse", "expert=8"), ("blocksparse", "data=2,fsdp=2,expert=2"),
            ("ragged", "fsdp=4,expert=2"))


def ep_checks() -> dict:
    """The MoE layer with ExpertParallelDispatcher vs the single-device layer (same weights), routing
    skewed so that expert shard 0 receives most (token, slot) pairs: outputs, gradients (input,
    router, experts, shared experts) and counts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax import sharding
    from dsv3_jax.expert_parallel import ExpertParallelDispatcher
    from dsv3_jax.moe import MoE

    cfg = CFG.replace(initializer_range=0.2)  # outputs O(1), so absolute bounds mean something
    E = cfg.n_routed_experts
    B, T, D = 8, 8, cfg.hidden_size
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)

    def loss(params, rest, gd, x):
        out = nnx.merge(gd, params, rest)(x)
        return jnp.sum(out.out * ct), (out.out, out.counts)

    grad = jax.jit(jax.grad(loss, argnums=(0, 3), has_aux=True), static_argnums=2)
    out: dict = {}
    for impl in sorted({i for i, _ in EP_CASES}):
        moe = MoE(cfg, impl=impl, rngs=nnx.Rngs(5))
        # Skew: experts 0..E/2-1 (groups 0 and 1, expert shard 0 of expert=2) get +0.5, expert 0 another +0.5.
        moe.gate.bias[...] = jnp.asarray([1.0] + [0.5] * (E // 2 - 1) + [0.0] * (E // 2), jnp.float32)
        gd, params, rest = nnx.split(moe, nnx.Param, ...)
        (g_ref, gx_ref), (y_ref, c_ref) = grad(params, rest, gd, x)
        for mesh_text in [m for i, m in EP_CASES if i == impl]:
            mesh = sharding.make_mesh(mesh_text)
            ep = nnx.merge(gd, params, rest)
            ep.dispatcher = ExpertParallelDispatcher(E, cfg.num_experts_per_tok, mesh)
            gd_ep, p_ep, r_ep = nnx.split(ep, nnx.Param, ...)
            put = lambda path, v: jax.device_put(v, jax.sharding.NamedSharding(  # noqa: E731
                mesh, jax.sharding.PartitionSpec("expert", None, "fsdp") if v.ndim == 3 else jax.sharding.PartitionSpec()))
            p_ep = jax.tree_util.tree_map_with_path(put, p_ep)
            xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
            (g, gx), (y, c) = grad(p_ep, r_ep, gd_ep, xs)
            # errors on host copies: jnp on each (shape, sharding) would compile ~70 tiny programs
            gl, gl_ref = jax.device_get(jax.tree.leaves(g)), jax.device_get(jax.tree.leaves(g_ref))
            y, gx, y_ref, gx_ref = jax.device_get((y, gx, y_ref, gx_ref))
            rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
            out[f"{impl} {mesh_text}"] = {
                "y_rel": rel(y, y_ref), "dx_rel": rel(gx, gx_ref),
                "dparams_rel": max(rel(a, b) for a, b in zip(gl, gl_ref)), "n_grads": len(gl),
                "counts_equal": bool(np.array_equal(np.asarray(c), np.asarray(c_ref))),
                "counts": np.asarray(c).tolist(),
                "is_ep": type(ep.dispatcher).__name__,
            }
    return out


SCAN_MESH = "data=2,fsdp=2,expert=2"


def scan_checks() -> dict:
    """CFG with two main layers (a dense stack and a MoE stack of one layer each, plus the MTP block)
    trained with scan_layers on SCAN_MESH (its MoE layers expert-parallel, the MoE stack's inside the
    scan) vs the same weights unrolled on one device: loss per step, router biases, parameters."""
    from flax import nnx

    from dsv3.training import TrainConfig
    from dsv3_jax import sharding
    from dsv3_jax.train import JaxBackend

    cfg = CFG.replace(num_hidden_layers=2)
    init, data = initial_state(cfg), batches()
    runs = {}
    for scan, mesh in ((False, None), (True, sharding.make_mesh(SCAN_MESH))):
        be = JaxBackend(cfg, TrainConfig(**TRAIN_KW, progress=False, plots=False, scan_layers=scan), mesh=mesh)
        be.load_canonical_state(init)
        runs[scan] = ([be.train_step(b, LR)["loss"] for b in data], be.canonical_state(), be)
    (ref_loss, ref, _), (loss, st, be) = runs[False], runs[True]
    specs = {"/".join(map(str, p)): str(v.get_value().sharding.spec)
             for p, v in nnx.to_flat_state(nnx.state(be.model.moe_stack.ffn.experts, nnx.Param))}
    return {**_against_reference(loss, st, ref_loss, ref, init), "steps": len(loss), "expert_specs": specs,
            "dispatchers": [type(m.dispatcher).__name__ for m in be.model.moe_layers()]}


def _against_reference(loss: list, st: dict, ref_loss: list, ref: dict, init: dict) -> dict:
    """A run's losses and final canonical state against the reference run's (same weights and batches):
    relative loss error per step, router biases bit-equal (and moved from ``init``), and the parameter with
    the largest max-abs error relative to its reference's max-abs."""
    rel = {k: float(np.max(np.abs(st[k] - ref[k])) / max(float(np.max(np.abs(ref[k]))), 1e-30))
           for k in ref if not k.endswith("gate.bias")}
    worst = max(rel, key=rel.get)
    biases = [k for k in ref if k.endswith("gate.bias")]
    return {"loss_rel": [abs(a - b) / abs(b) for a, b in zip(loss, ref_loss)],
            "bias_equal": all(np.array_equal(st[k], ref[k]) for k in biases),
            "bias_moved": all(np.any(st[k] != init[k]) for k in biases),
            "param_worst": [worst, rel[worst]]}


def _host_canonical_state(be, host) -> dict:
    """be's canonical state, exported by the single-device backend ``host`` after copying be's
    variables into it: the export's transposes run on one device (compiled once for the reference),
    not once more per mesh layout. ``host`` keeps its own values afterwards."""
    from flax import nnx

    keep = _on_one_device(nnx.state(host.model))
    nnx.update(host.model, _on_one_device(nnx.state(be.model)))
    try:
        return host.canonical_state()
    finally:
        nnx.update(host.model, keep)


def _on_one_device(tree):
    """Host copies of a tree's arrays, as uncommitted arrays on the default device."""
    import jax

    return jax.tree.map(lambda a: jax.numpy.asarray(a), jax.device_get(tree))


def _still_sharded(be) -> bool:
    """After training, every variable keeps the sharding the rules gave it."""
    from flax import nnx

    from dsv3_jax import sharding

    sizes = sharding.mesh_shape(be.mesh)
    want = sharding.model_specs(be.model, sizes)
    return all(tuple(var.get_value().sharding.spec) == tuple(want[tuple(path)])
               for path, var in nnx.to_flat_state(nnx.state(be.model)))


def main() -> None:
    t0 = time.perf_counter()
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        res["cli"] = run_cli(tmp)
    from dsv3 import runtime

    runtime.configure()
    res["cpu_s"] = {"cli": time.process_time()}
    res["ep"] = ep_checks()
    res["cpu_s"]["ep"] = time.process_time() - res["cpu_s"]["cli"]
    res["train"] = train_checks()
    res["cpu_s"]["train"] = time.process_time() - res["cpu_s"]["ep"] - res["cpu_s"]["cli"]
    res["scan"] = scan_checks()
    res["seconds"] = time.perf_counter() - t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
