"""Random small configs drawn by hypothesis (heads, ranks, experts, groups, top-k, dense layers, MTP
depth, YaRN on/off, shared experts, q LoRA on/off): logits, loss terms, router counts and gradients
agree between dsv3_torch and dsv3_jax. Few, derandomised examples: each one compiles a new model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3.config import ModelConfig
from parity_util import GRAD_TOL, make_pair, record
from test_parity_model import batch, compare_forward, grad_err, jax_grads, torch_grads


@st.composite
def configs(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.sampled_from([2, 3, 4]))
    topk_group = draw(st.integers(1, n_group))
    E = n_group * per_group
    K = draw(st.integers(1, min(4, topk_group * per_group)))
    dense = draw(st.integers(0, 2))
    yarn = draw(st.booleans())
    return ModelConfig(
        vocab_size=64, hidden_size=draw(st.sampled_from([32, 48])), intermediate_size=48,
        moe_intermediate_size=draw(st.sampled_from([8, 16])), num_hidden_layers=dense + draw(st.integers(1, 2)),
        first_k_dense_replace=dense, num_attention_heads=draw(st.sampled_from([1, 2, 4])),
        n_routed_experts=E, n_shared_experts=draw(st.integers(0, 2)), num_experts_per_tok=K, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        q_lora_rank=draw(st.sampled_from([None, 16, 24])), kv_lora_rank=draw(st.sampled_from([8, 16])),
        qk_nope_head_dim=draw(st.sampled_from([4, 8])), qk_rope_head_dim=draw(st.sampled_from([2, 4, 8])),
        v_head_dim=draw(st.sampled_from([4, 8])),
        rope_scaling_type="yarn" if yarn else None, rope_factor=draw(st.sampled_from([2.0, 8.0, 40.0])),
        original_max_position_embeddings=16, max_position_embeddings=64,
        mscale=draw(st.sampled_from([0.0, 0.7, 1.0])), mscale_all_dim=draw(st.sampled_from([0.0, 1.0])),
        num_nextn_predict_layers=draw(st.integers(0, 2)), initializer_range=0.02,
    )


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cfg=configs(), born=st.sampled_from(["torch", "jax"]))
def test_random_config_forward_and_gradients(cfg, born):
    tm, jm = make_pair(cfg, "float32", born, seed=5)
    compare_forward(tm, jm, cfg, "float32", tag=" [random cfgs]", seed=4)
    ids, labels = batch(cfg, seed=5)
    gt, _ = torch_grads(tm, ids, labels)
    gj = jax_grads(jm, ids, labels)
    assert set(gt) == set(gj)
    worst = max(grad_err(gj[k], gt[k]) for k in gt)
    record("grad all params [random cfgs]", "float32", worst, GRAD_TOL["float32"], "max|d|/max|g| per tensor")
    assert worst <= GRAD_TOL["float32"], worst
