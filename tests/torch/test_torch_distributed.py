"""torch.distributed on CPU (gloo): meshes, FSDP2, expert parallelism, DCP, HF export.

The multi-process checks run in ONE torchrun launch of 4 processes per test run
(tests/torch/dist_job.py): every 4-rank check on a 4-rank process group (four
meshes trained 20 steps against the single-process run, the expert-parallel
layer, gradient accumulation, the DCP save and an exact resume), then ranks 0
and 1 form a new 2-rank process group that restores the 4-rank DCP checkpoint on
2 ranks and runs `dsv3 train --mesh` (ranks 2 and 3 exit). The 1-rank restore
runs in this process without a process group. The tests that read the launch's
results share one xdist group, so one worker starts it once.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from dsv3_torch.sharding import AXES, backend_for, format_mesh, parse_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(ROOT, "tests", "torch", "dist_job.py")
MESHES = ("data=4", "fsdp=4", "fsdp=2,expert=2", "expert=4")


# -------------------------------------------------------------- unit tests
def test_parse_mesh():
    assert parse_mesh("fsdp=2,expert=2") == {"data": 1, "fsdp": 2, "expert": 2}
    assert parse_mesh("data=4", 4) == {"data": 4, "fsdp": 1, "expert": 1}
    assert parse_mesh(None, 4) == {"data": 1, "fsdp": 4, "expert": 1}
    assert parse_mesh(" expert = 4 ") == {"data": 1, "fsdp": 1, "expert": 4}
    assert format_mesh(parse_mesh("expert=2,data=2")) == "data=2,fsdp=1,expert=2"
    assert AXES == ("data", "fsdp", "expert")
    for bad in ("tensor=2", "fsdp", "fsdp=0", "fsdp=x", "fsdp=2,fsdp=2"):
        with pytest.raises(ValueError):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="has 4 ranks, the job has 8"):
        parse_mesh("fsdp=2,expert=2", 8)


def test_backend_choice():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"


# --------------------------------------------------------------- the jobs
# The launch (fixtures job4 / job2, tests/conftest.py) runs once: every test reading it shares the xdist
# group of both scale jobs.
DIST_JOB = pytest.mark.xdist_group("scale_jobs")


def _load(path: str) -> dict:
    with np.load(path) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


@pytest.mark.slow
@DIST_JOB
@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_training_equals_single_process(job4, mesh):
    r = json.load(open(os.path.join(job4, "train.json")))[mesh]
    print(f"{mesh}: loss rel {r['loss_rel']:.2e}, worst parameter {r['worst']} rel {r['param_rel']:.2e} "
          f"(max-abs rel {r['param_max_rel']:.2e})")
    assert r["keys_equal"]
    assert len(r["loss"]) == 20
    assert r["loss_rel"] <= 1e-5
    assert r["biases_changed"] and r["bias_equal"]
    assert r["param_rel"] <= 1e-5


@pytest.mark.slow
@DIST_JOB
def test_expert_parallel_layer_equals_single_process(job4):
    r = json.load(open(os.path.join(job4, "ep.json")))
    for case in r["cases"]:
        print(case)
        assert case["counts_equal"], case
        assert case["out_err"] <= 1e-6, case
        assert case["grad_err"] <= 1e-6, case
    assert any(case["zero_split"] for case in r["cases"])  # some rank sent nothing to some expert rank
    assert any(case["skew"] >= 0.5 for case in r["cases"])  # one expert rank received most rows


@pytest.mark.slow
@DIST_JOB
def test_gradient_accumulation_under_fsdp_equals_one_batch(job4):
    r = json.load(open(os.path.join(job4, "accum.json")))
    print(f"{r['mesh']}: loss rel {r['loss_rel']:.2e}, first-step gradients rel {r['grad_rel']:.2e}, "
          f"worst parameter {r['worst']} rel {r['param_rel']:.2e}")
    assert r["grad_keys_equal"]
    assert r["grad_rel"] <= 1e-5
    assert r["loss_rel"] <= 1e-5
    assert r["param_rel"] <= 1e-5
    assert r["bias_equal"]


@pytest.mark.slow
@DIST_JOB
def test_dcp_resume_is_exact(job4):
    r = json.load(open(os.path.join(job4, "train.json")))["fsdp=2,expert=2"]
    assert r["resumed_equal"]  # losses of steps 16-20 after a restore: bit for bit
    assert r["resumed_state_equal"]


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.slow
@DIST_JOB
def test_dcp_restore_on_two_ranks(job2):
    saved_m, saved_o = _load(os.path.join(job2, "saved_model.npz")), _load(os.path.join(job2, "saved_optim.npz"))
    for spec in ("fsdp2", "expert2"):
        _assert_same(_load(os.path.join(job2, f"restored_{spec}_model.npz")), saved_m)
        _assert_same(_load(os.path.join(job2, f"restored_{spec}_optim.npz")), saved_o)


@pytest.mark.slow
@DIST_JOB
def test_dcp_restore_on_one_process_and_hf_export(job4):
    sys.path.insert(0, os.path.dirname(JOB))
    try:
        import dist_job
    finally:
        sys.path.pop(0)
    from dsv3_torch.dist_checkpoint import load_dcp
    from dsv3_torch.model import DeepSeekV3
    from dsv3_torch.train import TorchBackend

    cfg = dist_job.tiny()
    single = TorchBackend(cfg, dist_job.tcfg(), model=dist_job.make_model(cfg, seed=1))
    load_dcp(os.path.join(job4, "dcp"), single.model, single.optimizer)
    saved_m = _load(os.path.join(job4, "saved_model.npz"))
    _assert_same(dist_job.model_state(single), saved_m)
    _assert_same(dist_job.optim_state(single), _load(os.path.join(job4, "saved_optim.npz")))
    # the HF safetensors written from the sharded model at the same step
    hf = DeepSeekV3.from_pretrained(os.path.join(job4, "hf"), dtype=torch.float32)
    _assert_same({k: v.float().numpy() for k, v in hf.state_dict().items()}, saved_m)
    # ... give the same logits in dsv3_jax and in transformers (fp32) as in dsv3_torch
    import dsv3_jax
    from torch_hf_ref import load_hf

    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).numpy()
        got_hf = load_hf(os.path.join(job4, "hf"))(torch.from_numpy(ids)).logits.numpy()
    got_jax = np.asarray(dsv3_jax.DeepSeekV3.from_pretrained(os.path.join(job4, "hf"))(ids))
    for got in (got_jax, got_hf):
        assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


@pytest.mark.slow
@DIST_JOB
def test_torchrun_dsv3_train_with_mesh_and_resume_on_another_mesh(job2, tmp_path):
    """`dsv3 train --mesh` on the launch's 2-rank process group (fsdp=2 for 2 steps, resumed on expert=2
    to 4 steps) equals the same 4 steps in one process; rank 0 alone wrote the run directory."""
    sys.path.insert(0, os.path.dirname(JOB))
    try:
        import dist_job
    finally:
        sys.path.pop(0)
    from dsv3.cli import main as dsv3_main
    from dsv3.rundir import read_metrics

    assert json.load(open(os.path.join(job2, "cli.json")))["rc"] == [0, 0]
    run_dir = os.path.join(job2, "cli_run")
    sharded = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in sharded] == [1, 2, 3, 4]  # one writer: no duplicate records
    assert open(os.path.join(run_dir, "latest")).read().strip() == "step_000004"
    ckpt = os.path.join(run_dir, "step_000004")
    assert sorted(f for f in os.listdir(os.path.join(ckpt, "dcp")) if f.endswith(".distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert json.load(open(os.path.join(ckpt, "train_state.json")))["mesh"] == "data=1,fsdp=1,expert=2"
    assert dsv3_main(dist_job.cli_args(job2) + ["--out", str(tmp_path / "single"), "--steps", "4"]) == 0
    single = [r for r in read_metrics(str(tmp_path / "single" / "metrics.jsonl")) if r["kind"] == "train"]
    for a, b in zip(sharded, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["counts"] == b["counts"]
