"""tests/torch: small configs, deterministic seeds, one intra-op thread.

The tiny models' matmuls are microseconds long; on a shared 2-core machine
OpenMP's barrier between two threads costs milliseconds per op when the other
core is busy. One thread is both faster and steadier here (figures:
docs/bench/README.md, "Measured choices in the code").
"""

import pytest
import torch

from dsv3 import ModelConfig


@pytest.fixture(autouse=True)
def _one_thread_and_seed(one_torch_thread):
    """Tests under tests/torch only: one thread (root conftest fixture, restored afterwards), seed 0."""
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    """Every feature on: q LoRA, n_group > topk_group > 1, a dense layer, a shared
    expert, YaRN with factor > 1 (m != 1), one MTP depth."""
    return ModelConfig.preset("tiny")


@pytest.fixture(params=["mkl", "onednn"])
def cpu_matmul_backend(request):
    """The test run once with each fp32 CPU matmul library (``dsv3_torch.cpu_matmul``), whichever this
    machine's default is."""
    from dsv3_torch import cpu_matmul

    if request.param == "onednn" and not cpu_matmul.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    with cpu_matmul.use(request.param):
        yield request.param

