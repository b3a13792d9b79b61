"""dsv3_jax against Hugging Face transformers 5.24 directly (eager attention, eager experts)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsv3.config import ModelConfig
from dsv3_jax import DeepSeekV3
from hf_tiny import hf_model

# Two layers where depth is not the point (one dense, one MoE: every block kind): each layer is compile time.
TINY2 = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
CONFIGS = {
    "tiny": TINY2,
    # no q LoRA, plain RoPE, all groups kept, 2 shared experts, two dense layers, no top-k norm
    "variant": TINY2.replace(
        q_lora_rank=None, rope_scaling_type=None, n_group=2, topk_group=2, n_shared_experts=2,
        num_hidden_layers=3, first_k_dense_replace=2, num_experts_per_tok=2, norm_topk_prob=False),
    # YaRN with mscale != mscale_all_dim: attention_factor != 1 on cos/sin
    "yarn-mscale": TINY2.replace(mscale=0.8, mscale_all_dim=0.5, rope_factor=8.0),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny torch ops: no OpenMP barrier between 2 threads


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    hf = hf_model(cfg, seed=1)
    d = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(d)
    return cfg, hf, DeepSeekV3.from_pretrained(d, dtype=jnp.float32), d


def test_logits_match_hf_fp32(hf_pair):
    cfg, hf, jm, _ = hf_pair
    assert jm.cfg.num_nextn_predict_layers == 0  # HF never saves an MTP layer
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    out = np.asarray(jm(jnp.asarray(tokens, jnp.int32)))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5, np.abs(out - ref).max()


def test_router_bias_loaded_from_hf(hf_pair):
    cfg, hf, jm, _ = hf_pair
    ref = hf.model.layers[cfg.first_k_dense_replace].mlp.gate.e_score_correction_bias.numpy()
    got = np.asarray(jm.layers[cfg.first_k_dense_replace].ffn.gate.bias[...])
    assert np.abs(ref).max() > 0
    np.testing.assert_array_equal(got, ref)


def test_save_pretrained_loads_in_hf(hf_pair, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg, hf, jm, _ = hf_pair
    jm.save_pretrained(tmp_path)
    hf2 = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                experts_implementation="eager").eval()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        a = hf(torch.as_tensor(tokens)).logits.numpy()
        b = hf2(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_array_equal(a, b)


def test_bf16_close_to_hf(hf_pair):
    """bf16 with the eager combine: logits within bf16 tolerance, KL < 1e-3."""
    from transformers import DeepseekV3ForCausalLM

    cfg, _, _, d = hf_pair
    # HF's bf16 load keeps the router weight and bias in fp32, as dsv3_jax does
    hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager",
                                               experts_implementation="eager").eval()
    jm = DeepSeekV3.from_pretrained(d, dtype=jnp.bfloat16, combine="eager")
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.float().numpy()
    out = np.asarray(jm(jnp.asarray(tokens, jnp.int32)).astype(jnp.float32))
    kl = (np.exp(log_softmax(ref)) * (log_softmax(ref) - log_softmax(out))).sum(-1).mean()
    assert kl < 1e-3, kl
    assert np.abs(out - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max()), np.abs(out - ref).max()
