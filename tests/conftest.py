"""The two scale-out jobs, each run once per test session (their tests share the xdist group
"scale_jobs", so one worker runs both): the JAX 8-simulated-device subprocess (tests/jax/mesh_checks.py)
and the torch 4-rank torchrun launch (tests/torch/dist_job.py). Both train the same work
(tests/scale_workload.py), so tests/test_scale_parity.py also compares them with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from scale_workload import free_port, subprocess_env  # tests/ is on sys.path while its conftest loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_JOB_SCRIPT = os.path.join(ROOT, "tests", "torch", "dist_job.py")


@pytest.fixture(scope="session")
def mesh_results():
    """The JSON the 8-device JAX subprocess prints (CLI run and resume, meshes, orbax, EP layer, bytes)."""
    # the script asks for its devices through `dsv3 train --cpu-devices 8`
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "jax", "mesh_checks.py")], cwd=ROOT,
                          env=subprocess_env(ROOT), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torchrun(nproc: int, out: str, *checks: str) -> None:
    env = {**subprocess_env(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), DIST_JOB_SCRIPT, out, *checks]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"torchrun job {checks!r} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    print(proc.stdout)


@pytest.fixture(scope="session")
def job4(tmp_path_factory) -> str:
    """The torch launch's directory: the 4-rank checks, then (ranks 0 and 1 in a new 2-rank process
    group) the 2-rank ones."""
    out = str(tmp_path_factory.mktemp("dist4"))
    torchrun(4, out, "train,ep,accum,xf", "restore,cli")
    return out


@pytest.fixture(scope="session")
def job2(job4) -> str:
    """The results of the 2-rank checks (same launch, same directory)."""
    return job4
