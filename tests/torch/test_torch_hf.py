"""Agreement with Hugging Face transformers 5.24 (eager attention, eager experts).

Weights travel through the real on-disk format in both directions: HF
save_pretrained -> our from_pretrained, and our save_pretrained -> HF
from_pretrained. Every config exercises q LoRA (or the direct wq), n_group >
topk_group > 1, a dense layer, a shared expert and a non-zero router bias.
"""

import math

import pytest
import torch

import dsv3_torch
from dsv3 import ModelConfig
from dsv3_torch.rope import rope_inv_freq
from torch_hf_ref import hf_routers, load_hf, make_hf

TINY = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
CONFIGS = {
    "yarn": TINY,  # factor 4, mscale_all_dim 1: m = 1 + 0.1 ln 4
    "yarn_attn_factor": TINY.replace(mscale=0.9, mscale_all_dim=0.6, rope_factor=8.0,
                                     max_position_embeddings=256),  # attention_factor != 1
    # plain RoPE (yarn fields at their defaults, which a plain config.json cannot carry)
    "plain_rope_direct_wq": TINY.replace(rope_scaling_type=None, q_lora_rank=None, rope_factor=40.0,
                                         original_max_position_embeddings=4096),
}
FP32_TOL = 1e-5


def _tokens(cfg, B=2, T=16, seed=1):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_checkpoint_loads_with_same_logits_fp32(name, tmp_path):
    cfg = CONFIGS[name]
    hf = make_hf(cfg)
    hf.save_pretrained(tmp_path)
    ours = dsv3_torch.DeepSeekV3.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.cfg == cfg  # HF never saves an MTP layer: loads with num_nextn_predict_layers=0
    assert all(r.bias.abs().sum() > 0 for r in ours.routers())
    x = _tokens(cfg)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
        err = (ref - got).abs().max().item()
        assert err <= FP32_TOL, f"{name}: max abs error {err:.3g}"
        # the bias matters for these inputs (so the comparison covers it)
        for r in ours.routers():
            r.bias.zero_()
        assert (ours(x) - ref).abs().max().item() > 1e-3


def test_rope_and_scale_match_hf():
    cfg = CONFIGS["yarn_attn_factor"]
    hf = make_hf(cfg)
    rot = hf.model.rotary_emb
    assert torch.equal(rope_inv_freq(cfg), rot.inv_freq)
    assert cfg.rope_attention_factor == rot.attention_scaling != 1.0
    m = 0.1 * cfg.mscale_all_dim * math.log(cfg.rope_factor) + 1
    assert cfg.softmax_scale == hf.model.layers[0].self_attn.scaling
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m, rel=1e-15)
    pos = torch.arange(40)[None]
    cos_hf, sin_hf = rot(torch.zeros(1, dtype=torch.bfloat16), pos)
    cos, sin = dsv3_torch.RotaryEmbedding(cfg)(pos[0], torch.bfloat16)
    R2 = cfg.qk_rope_head_dim // 2
    assert torch.equal(cos, cos_hf[0, :, :R2]) and torch.equal(sin, sin_hf[0, :, :R2])


def test_router_matches_hf_selection_and_weights():
    cfg = TINY
    hf = make_hf(cfg)
    ours = dsv3_torch.DeepSeekV3(cfg)
    hf_gate = hf_routers(hf)[0]
    ours_gate = ours.routers()[0]
    with torch.no_grad():
        ours_gate.weight.copy_(hf_gate.weight)
        ours_gate.bias.copy_(hf_gate.e_score_correction_bias)
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        _, w_hf, idx_hf = hf_gate(x)
        r = ours_gate(x)
    order = idx_hf.argsort(-1)
    assert torch.equal(r.indices, idx_hf.gather(1, order))
    torch.testing.assert_close(r.weights, w_hf.gather(1, order), rtol=1e-6, atol=1e-7)


def test_bf16_eager_scheme_is_bit_identical_and_grouped_close(tmp_path):
    cfg = TINY
    make_hf(cfg).save_pretrained(tmp_path)
    hf = load_hf(tmp_path, torch.bfloat16)
    ours = dsv3_torch.DeepSeekV3.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.routers()[0].weight.dtype == torch.float32  # router stays fp32
    x = _tokens(cfg, T=24)
    with torch.no_grad():
        ref = hf(x).logits
        ours.set_moe_combine("eager")
        eager = ours(x)
        ours.set_moe_combine("grouped")
        grouped = ours(x)
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager, ref), (eager.float() - ref.float()).abs().max()
    err = (grouped.float() - ref.float()).abs().max().item()
    assert 0 < err <= 2e-2, err  # the two combine schemes round differently (docs/reference.md §4.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_checkpoint_loads_in_transformers(dtype, tmp_path):
    cfg = ModelConfig.preset("tiny")  # with an MTP depth: HF ignores that layer
    ours = dsv3_torch.DeepSeekV3(cfg, dtype=dtype)
    ours.set_moe_combine("eager")
    with torch.no_grad():
        for i, r in enumerate(ours.routers()):
            r.bias.copy_(torch.rand(cfg.n_routed_experts, generator=torch.Generator().manual_seed(i)) * 0.3)
    ours.save_pretrained(tmp_path)
    hf = load_hf(tmp_path, dtype)
    x = _tokens(cfg)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    if dtype == torch.float32:
        assert (ref - got).abs().max().item() <= FP32_TOL
    else:
        assert torch.equal(ref, got)
    # and back: the MTP depth survives our own round trip
    again = dsv3_torch.DeepSeekV3.from_pretrained(tmp_path, dtype=dtype)
    assert again.cfg == cfg
    assert not any(t.is_meta for t in again.state_dict().values())  # built on meta, then filled
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
