"""tests/torch: small configs, deterministic seeds, fp32 matmuls on CPU."""

import pytest
import torch

from dsv3 import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ModelConfig:
    """Every feature on: q LoRA, n_group > topk_group > 1, a dense layer, a shared
    expert, YaRN with factor > 1 (m != 1), one MTP depth."""
    return ModelConfig.preset("tiny")
