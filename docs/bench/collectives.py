"""What each collective moves per optimizer step, counted in the compiled HLO of the sharded training
step, next to the analytic formula of docs/scaling.md section 4 (``dsv3_jax.hlo``).

    python docs/bench/collectives.py            # from the repository root; 8 simulated CPU devices

Compiles (does not run) the step of the mesh tests' workload (tests/scale_workload.py: the tiny preset
with one dense layer and the MTP block, 2 micro-batches of 8 sequences of 16 tokens) on each mesh and
prints one markdown table: per mesh and kind, instructions executed per step (loop bodies multiplied
by their known trip counts), bytes per device from the HLO, bytes per device from the formula.
"""

from __future__ import annotations

import os
import sys

assert "jax" not in sys.modules
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "expert=8")


def measure(mesh: str) -> tuple[dict, dict]:
    """(counted, formula) for the workload's step on ``mesh``."""
    from scale_workload import ACCUM, BATCH, CFG, SEQ, TRAIN_KW, batches

    from dsv3.training import TrainConfig
    from dsv3_jax import hlo, sharding
    from dsv3_jax.train import JaxBackend

    tcfg = TrainConfig(**TRAIN_KW, progress=False, plots=False)
    be = JaxBackend(CFG, tcfg, mesh=sharding.make_mesh(mesh))
    counted = hlo.count_collectives(be.lower_train_step(batches()[0], tcfg.lr).compile())
    sizes = sharding.parse_mesh(mesh)
    n = BATCH // ACCUM * SEQ // sharding.mesh_size(sizes)  # tokens per device per micro-batch
    return counted, hlo.analytic_bytes(CFG, sizes, grad_accum=ACCUM, tokens_per_micro_batch=n)


def main() -> None:
    from dsv3_jax import hlo

    print("| mesh | collective | count | HLO bytes/device | formula bytes/device |")
    print("|---|---|---:|---:|---:|")
    for mesh in MESHES:
        counted, formula = measure(mesh)
        for kind in hlo.KINDS:
            c = counted[kind]
            if c["count"] or formula[kind]:
                print(f"| {mesh} | {kind} | {c['count']} | {c['bytes']:,.0f} | {formula[kind]:,.0f} |")
        print(f"| {mesh} | **total** | | **{counted['total_bytes']:,.0f}** | **{sum(formula.values()):,.0f}** |")
        assert counted["unknown_trip_count"] == 0, counted


if __name__ == "__main__":
    main()
