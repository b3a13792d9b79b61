"""dsv3_jax.sharding: the mesh, the rules table, the byte plan, and (in one 8-device subprocess,
tests/jax/mesh_checks.py) sharded training == single-device training, bytes per device and the
expert-parallel MoE layer."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from dsv3 import ModelConfig
from dsv3.names import canonical_shapes
from dsv3_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------ single process
def test_parse_mesh():
    assert sharding.parse_mesh("data=2,fsdp=2,expert=2") == {"data": 2, "fsdp": 2, "expert": 2}
    assert sharding.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "expert": 1}
    assert sharding.parse_mesh(None) == {"data": 1, "fsdp": 1, "expert": 1}
    for bad, msg in (("tensor=2", "unknown axes"), ("data=0", ">= 1"), ("data", "axis=size"),
                     ("data=x", "integer"), ("data=2,data=2", "twice")):
        with pytest.raises(ValueError, match=msg):
            sharding.parse_mesh(bad)


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 8 devices.*--cpu-devices 8"):
        sharding.make_mesh("data=8")


def test_mesh_axes_are_auto():
    from jax.sharding import AxisType

    mesh = sharding.make_mesh("data=1")
    assert mesh.axis_names == sharding.AXES
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("preset", ["tiny", "v3-671b"])
def test_every_parameter_has_a_rule_of_its_rank(preset):
    cfg = ModelConfig.preset(preset)
    mesh = {"data": 8, "fsdp": 32, "expert": 32}
    table = sharding.spec_table(cfg, mesh)
    assert set(table) == set(canonical_shapes(cfg))
    for name, shape in canonical_shapes(cfg).items():
        assert len(table[name]) == len(shape), name
    # On the real model every rule applies as written (every sharded dimension divides).
    if preset == "v3-671b":
        for name, shape in canonical_shapes(cfg).items():
            assert table[name] == P(*sharding.rule_for(name)), name
        assert table["layers.3.ffn.experts.w1"] == P("expert", "fsdp", None)
        assert table["layers.3.ffn.gate.bias"] == P(None)
        assert table["embed.weight"] == P("fsdp", None)


def test_non_dividing_axis_is_dropped():
    assert sharding.spec_for("layers.0.attn.wkv_a.weight", (24, 64), {"fsdp": 16}) == P(None, None)
    assert sharding.spec_for("layers.0.attn.wkv_a.weight", (24, 64), {"fsdp": 8}) == P("fsdp", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.rule_for("layers.0.attn.unknown.weight")


def test_flax_layout_of_specs():
    assert sharding.to_flax_layout(P("fsdp", None), "T") == P(None, "fsdp")
    assert sharding.to_flax_layout(P("expert", "fsdp", None), "E") == P("expert", None, "fsdp")
    assert sharding.to_flax_layout(P(None), "id") == P(None)


def test_plan_of_v3_on_a_pod_is_abstract_and_consistent():
    """dsv3 info --mesh: bytes from nnx.eval_shape + the rules; fsdp x expert splits experts 1024 ways."""
    cfg = ModelConfig.preset("v3-671b")
    plan = sharding.abstract_plan(cfg, "data=8,fsdp=32,expert=32")
    mesh = sharding.parse_mesh("data=8,fsdp=32,expert=32")
    table = sharding.spec_table(cfg, mesh)
    # The abstract model's variables, placed by path, give the same bytes as the canonical table.
    expected = sum(math.prod(s) * 4 // sharding.shard_factor(table[n], mesh) for n, s in canonical_shapes(cfg).items())
    assert plan["params"] == expected
    experts = sum(math.prod(s) for n, s in canonical_shapes(cfg).items() if ".experts." in n)
    assert experts * 4 // 1024 < plan["params"] < experts * 4 // 1024 + 4 * 17.5e9 / 32 + 5e6
    assert plan["optimizer"] == pytest.approx(2 * plan["params"], rel=1e-4)  # mu and nu per parameter
    assert plan["devices"] == 8 * 32 * 32


def test_info_mesh_cli(capsys):
    from dsv3 import cli

    assert cli.main(["info", "--preset", "tiny", "--mesh", "fsdp=1"]) == 0
    out = capsys.readouterr().out
    assert "per device on data=1,fsdp=1,expert=1" in out and "AdamW state" in out


def test_cpu_devices_refuses_after_jax_started():
    from dsv3 import cli

    with pytest.raises(ValueError, match="already imported"):
        cli.set_cpu_devices(8)


# A module of the shape XLA prints: a while loop (the micro-batch scan) with its trip count, a tuple
# all-reduce in its body, an async all-gather and a reduce-scatter in the entry computation.
_HLO = """HloModule jit_step, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %ar = (f32[64,32]{1,0}, bf16[16]{0}) all-reduce(%x, %y), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[64,32]) tuple(%i, %x)
}

%cond (p: (s32[], f32[64,32])) -> pred[] {
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,32]) -> f32[64,32] {
  %ags = (f32[8,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%a), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = f32[64,32]{1,0} all-gather-done(%ags)
  %rs = s32[4]{0} reduce-scatter(%z), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}, to_apply=%add
  %w = (s32[], f32[64,32]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[64,32] get-tuple-element(%w), index=1
}
"""


def test_hlo_collectives_are_counted_from_the_text():
    from dsv3_jax import hlo

    assert hlo.group_size("replica_groups={{0,1},{2,3}}, dimensions={0}") == 2
    assert hlo.group_size("replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert hlo.group_size("replica_groups=[4,2]<=[2,2,2]T(0,2,1), to_apply=%add") == 2
    assert hlo.group_size("replica_groups={}, to_apply=%add", num_partitions=8) == 8
    assert hlo.group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, x") == 4
    assert hlo.group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}, x") == 8
    assert hlo.shape_bytes("(f32[8,16]{1,0}, bf16[4]{0}, s32[], pred[3])") == 512 + 8 + 4 + 3
    c = hlo.count_collectives(_HLO)
    assert c["unknown_trip_count"] == 0
    # in the loop body, 3 times: 2 (g-1)/g of (8192 + 32) bytes, g = 4
    assert c["all-reduce"] == {"count": 3, "bytes": 3 * 2 * 3 / 4 * (64 * 32 * 4 + 16 * 2)}
    # async all-gather of an 8x32 f32 shard over 8 devices: 7 shards in
    assert c["all-gather"] == {"count": 1, "bytes": 7 * 8 * 32 * 4}
    # reduce-scatter to s32[4] over groups of 2: the operand is s32[8], (g-1)/g of it
    assert c["reduce-scatter"] == {"count": 1, "bytes": 0.5 * 8 * 4}
    no_count = _HLO.replace('backend_config={"known_trip_count":{"n":"3"}}', "")
    c = hlo.count_collectives(no_count)
    assert c["unknown_trip_count"] == 1 and c["all-reduce"]["count"] == 1  # counted once per body
    # a loop without a trip count around no collective (the MoE expert loop's) changes no count
    quiet = no_count.replace("%ar = (f32[64,32]{1,0}, bf16[16]{0}) all-reduce(%x, %y)", "%ar = f32[64,32] add(%x, %x)")
    c = hlo.count_collectives(quiet)
    assert c["unknown_trip_count"] == 0 and c["all-reduce"]["count"] == 0 and c["all-gather"]["count"] == 1


# -------------------------------------------------------- 8 devices, one run
# The tests that read the subprocess's results (fixture mesh_results, tests/conftest.py) share the xdist
# group of both scale jobs: one worker runs it once.
MESH_JOB = pytest.mark.xdist_group("scale_jobs")


@pytest.mark.slow
@MESH_JOB
def test_cli_trains_on_a_simulated_mesh(mesh_results):
    print(f"subprocess: {mesh_results['seconds']:.0f} s wall, CPU s per part {mesh_results['cpu_s']}")
    r = mesh_results["cli"]
    assert r["rc"] == [0, 0] and r["devices"] == 8
    assert r["train_records"] == 4 and r["eval_records"] == 2
    assert all(math.isfinite(x) for x in r["losses"])
    # a --mesh run's checkpoint keeps its state sharded (orbax/) beside the HF export, and --resume from
    # the step-2 checkpoint reproduces every record of the uninterrupted run bit for bit
    assert {"orbax", "config.json", "model.safetensors", "train_state.json"} <= set(r["checkpoint_files"])
    assert r["resumed_records"] == 6 and r["resumed_equal"]


@pytest.mark.slow
@MESH_JOB
@pytest.mark.parametrize("target", ["data=2,fsdp=2,expert=2", "one device"])
def test_orbax_checkpoint_restores_onto_another_mesh_bit_exact(mesh_results, target):
    """The fsdp=8 state after 20 steps, saved with orbax (every device its shards), restored onto another
    mesh shape and onto one device: every model and AdamW array bit for bit."""
    r = mesh_results["train"]["orbax"][target]
    assert r["bit_exact"]
    assert r["devices"] == ([8] if target != "one device" else [1])


@pytest.mark.slow
@MESH_JOB
def test_two_processes_of_four_devices_train_like_one_process_of_eight(mesh_results, tmp_path):
    """`dsv3 train` as 2 processes x 4 simulated devices (jax.distributed, gloo) on the CLI run's mesh and
    work: the same losses as the one-process, 8-device run of the subprocess; process 0 alone wrote the
    run directory, both processes their orbax shards."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    try:
        import scale_workload
    finally:
        sys.path.pop(0)
    cfg_dir, text = str(tmp_path / "cfg"), str(tmp_path / "corpus.txt")
    scale_workload.write_cli_inputs(cfg_dir, text)
    out = str(tmp_path / "run")
    env, port = scale_workload.subprocess_env(ROOT), scale_workload.free_port()
    args = scale_workload.cli_args(cfg_dir, text, out, devices=4)
    procs = [subprocess.Popen([sys.executable, "-m", "dsv3", *args, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    from dsv3.training import read_metrics

    recs = read_metrics(os.path.join(out, "metrics.jsonl"))
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    want = mesh_results["cli"]["losses"]
    assert len(losses) == len(want) == 4  # one writer: no duplicate records
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want)) <= 1e-5
    assert "orbax" in os.listdir(os.path.join(out, "step_000004"))


@pytest.mark.slow
@MESH_JOB
@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "expert=8"])
def test_sharded_training_equals_single_device(mesh_results, mesh):
    r = mesh_results["train"]["meshes"][mesh]
    ref = mesh_results["train"]["ref_loss"]
    assert len(r["loss"]) == len(ref) == 20
    print(f"{mesh}: worst loss rel {max(r['loss_rel']):.2e}, worst parameter {r['param_worst']}")
    assert max(r["loss_rel"]) <= 1e-5
    assert r["bias_equal"] and r["bias_moved"]
    assert r["param_worst"][1] <= 1e-5
    assert r["still_sharded"]
    assert r["dispatcher"] == ("ExpertParallelDispatcher" if "expert" in mesh else "LocalDispatcher")


@pytest.mark.slow
@MESH_JOB
@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "expert=8"])
def test_bytes_per_device_match_the_plan(mesh_results, mesh):
    r = mesh_results["train"]["meshes"][mesh]
    assert r["devices_with_state"] == 8
    assert r["measured_bytes"] == [r["planned_bytes"]]  # every device holds the same, exactly the plan
    single = mesh_results["train"]["single_device_bytes"]
    if mesh == "fsdp=8":  # everything but norms, router biases and step counts is split 8 ways
        assert single / 8 <= r["planned_bytes"] <= single / 8 * 1.05
    if mesh == "data=8":
        assert r["planned_bytes"] == single


@pytest.mark.slow
@MESH_JOB
@pytest.mark.parametrize("impl, mesh", [("loop", "expert=8"), ("blocksparse", "expert=8"),
                                        ("blocksparse", "data=2,fsdp=2,expert=2"), ("ragged", "fsdp=4,expert=2")])
def test_expert_parallel_layer_equals_single_device(mesh_results, impl, mesh):
    """Skewed routing: experts 0-3 (expert shard 0 of expert=2) receive almost every (token, slot)."""
    r = mesh_results["ep"][f"{impl} {mesh}"]
    print(f"{impl} {mesh}: rel err y {r['y_rel']:.1e}, dx {r['dx_rel']:.1e}, dparams {r['dparams_rel']:.1e}, "
          f"counts {r['counts']}")
    assert r["is_ep"] == "ExpertParallelDispatcher"
    assert r["counts_equal"]
    assert sum(r["counts"][:4]) >= 0.9 * sum(r["counts"])  # the skew is real
    assert r["n_grads"] == 7  # router, w1/w2/w3, shared w1/w2/w3
    assert max(r["y_rel"], r["dx_rel"], r["dparams_rel"]) <= 1e-6


@pytest.mark.slow
@MESH_JOB
def test_collectives_of_the_compiled_step_against_the_formula(mesh_results):
    """Bytes per device per optimizer step counted in the compiled HLO (dsv3_jax.hlo) vs the formula of
    docs/scaling.md section 4 (k = 2 micro-batches). The factors are what XLA:CPU compiles; the doc's
    table explains each."""
    r = mesh_results["train"]["collectives"]
    for mesh in ("fsdp=8", "expert=8"):
        # no collective inside a loop of data-dependent trips: on fsdp=8 the MoE runs block-sparse (the
        # expert loop under GSPMD gathered each expert's weights inside the loop), on expert=8 each shard
        # loops over its own rows
        assert r[mesh]["hlo"]["unknown_trip_count"] == 0
        print(mesh, {k: (r[mesh]["hlo"][k]["bytes"], r[mesh]["formula"][k]) for k in r[mesh]["formula"]})
    ratio = lambda mesh, kind: r[mesh]["hlo"][kind]["bytes"] / r[mesh]["formula"][kind]  # noqa: E731
    # expert=8: the ring of experts (all-gather of x/ids/weights, psum-scatter of the outputs, and their
    # transposes in the backward) is what the formula says, within the small collectives beside it
    assert 0.9 <= ratio("expert=8", "all-gather") <= 1.3
    assert 0.9 <= ratio("expert=8", "reduce-scatter") <= 1.1
    # fsdp=8: no reduce-scatter -- the gradients are all-reduced at full size in each micro-batch
    # (2x the reduce-scatter's bytes), and part of the weights' all-gathers is hoisted out of the
    # micro-batch loop or replaced by an all-reduce of activations (fewer gathered bytes than 2k x W)
    fsdp = r["fsdp=8"]
    assert fsdp["hlo"]["reduce-scatter"]["count"] == 0 and fsdp["formula"]["reduce-scatter"] > 0
    assert 2.0 <= fsdp["hlo"]["all-reduce"]["bytes"] / fsdp["formula"]["reduce-scatter"] <= 3.2
    assert 0.3 <= ratio("fsdp=8", "all-gather") <= 1.0


@pytest.mark.slow
@MESH_JOB
def test_scanned_layers_on_a_mesh_equal_unrolled_on_one_device(mesh_results):
    """scan_layers on data=2,fsdp=2,expert=2 (both MoE layers expert-parallel, the MoE stack's inside the
    scan), 20 steps, vs the unrolled 2-layer model on one device: the issue's bounds for a mesh."""
    r = mesh_results["scan"]
    assert r["steps"] == 20 and max(r["loss_rel"]) <= 1e-5, r["loss_rel"]
    assert r["bias_equal"] and r["bias_moved"]
    assert r["param_worst"][1] <= 1e-5, r["param_worst"]
    assert r["dispatchers"] == ["ExpertParallelDispatcher"] * 2
    assert r["expert_specs"]["w1"] == "P(None, 'expert', None, 'fsdp')"
