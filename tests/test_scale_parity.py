"""Across frameworks at scale: the torch run on 4 gloo ranks (fsdp=2,expert=2) and the JAX run on an
8-device CPU mesh (data=2,fsdp=2,expert=2), from the same weights on the same batches
(tests/scale_workload.py), train the same loss curve. Both jobs are the session fixtures of
tests/conftest.py (one xdist group: the worker that runs this runs both jobs once)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_workload as w  # noqa: E402

sys.path.pop(0)


@pytest.mark.slow
@pytest.mark.xdist_group("scale_jobs")
def test_torch_on_4_ranks_and_jax_on_8_devices_train_the_same_losses(mesh_results, job4):
    torch_run = json.load(open(os.path.join(job4, "xf.json")))
    jax_loss = mesh_results["train"]["meshes"][w.JAX_MESH]["loss"]
    assert torch_run["mesh"] == w.TORCH_MESH
    assert len(torch_run["loss"]) == len(jax_loss) == w.STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(torch_run["loss"], jax_loss)]
    print(f"torch {w.TORCH_MESH} vs JAX {w.JAX_MESH}: worst loss rel {max(rel):.2e} (step {rel.index(max(rel)) + 1})")
    assert max(rel) <= 1e-5
