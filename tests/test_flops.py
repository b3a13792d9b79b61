"""Checks of dsv3/flops.py against independent counts (docs/reference.md §1, §2.1, Paper)."""

import math

import pytest

from dsv3 import ModelConfig
from dsv3 import flops
from dsv3.names import canonical_shapes

PRESETS = ["tiny", "small", "v3-671b"]


@pytest.mark.parametrize("name", PRESETS)
def test_param_count_equals_canonical_shapes(name):
    cfg = ModelConfig.preset(name)
    shapes = canonical_shapes(cfg)
    pc = flops.param_counts(cfg)
    params = {k: s for k, s in shapes.items() if not k.endswith("gate.bias")}  # the router bias is a buffer
    assert pc.stored == sum(math.prod(s) for s in shapes.values())
    assert pc.total == sum(math.prod(s) for s in params.values())
    assert pc.router_biases == sum(math.prod(s) for k, s in shapes.items() if k.endswith("gate.bias"))
    assert pc.mtp == sum(math.prod(s) for k, s in params.items() if k.startswith("mtp."))
    assert pc.routed_experts == sum(math.prod(s) for k, s in params.items()
                                    if k.startswith("layers.") and ".ffn.experts." in k)
    assert pc.main + pc.mtp == pc.total


def test_no_q_lora_and_no_shared_expert_counts():
    cfg = ModelConfig.preset("tiny").replace(q_lora_rank=None, n_shared_experts=0,
                                             num_nextn_predict_layers=0)
    pc = flops.param_counts(cfg)
    assert pc.stored == sum(math.prod(s) for s in canonical_shapes(cfg).values())
    assert pc.mtp == 0 and pc.mtp_active_matmul_per_token == 0


def test_param_counts_of_the_small_model():
    """Counted on dsv3_torch.DeepSeekV3(small).num_parameters(): 8,561,088 parameters and 64 router-bias
    buffers (3 MoE layers + 1 MTP block, 16 experts each)."""
    pc = flops.param_counts(ModelConfig.preset("small"))
    assert (pc.total, pc.router_biases, pc.stored) == (8_561_088, 64, 8_561_152)
    assert pc.main == 6_552_576  # the "6.55M parameters without MTP" of the preset


def test_v3_published_sizes():
    cfg = ModelConfig.preset("v3-671b")
    pc = flops.param_counts(cfg)
    assert round(pc.main / 1e9) == 671  # "671B total parameters"
    assert 37e9 <= pc.active_per_token <= 38e9  # "37B activated for each token"
    # docs/reference.md §6: the MTP module adds 11.5B unique parameters.
    assert 11.4e9 < pc.mtp < 11.7e9
    # The checkpoint ("685B") also stores the MTP's copies of embed and head.
    assert 684e9 < pc.total + pc.embedding + pc.head < 686e9
    assert pc.total == 682_636_472_320 and pc.stored == 682_636_487_424  # 59 routers x 256 biases apart


def test_latent_cache_is_rank_plus_rope_per_layer():
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        v = flops.kv_cache_values_per_token(cfg)
        assert v["latent"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
        H = cfg.num_attention_heads
        assert v["naive"] == H * (cfg.qk_nope_head_dim + 2 * cfg.qk_rope_head_dim // 2 + cfg.v_head_dim) \
            * cfg.num_hidden_layers
        assert v["mha"] == 2 * H * cfg.v_head_dim * cfg.num_hidden_layers


def test_v3_latent_cache_bytes_reference():
    cfg = ModelConfig.preset("v3-671b")
    b = flops.kv_cache_bytes_per_token(cfg, "bf16")
    assert b["latent"] == 70_272  # docs/reference.md §2.1
    assert b["latent"] // cfg.num_hidden_layers == 1_152
    assert flops.kv_cache_values_per_token(cfg)["naive"] // cfg.num_hidden_layers == 40_960
    assert flops.kv_cache_bytes_per_token(cfg, "fp32")["latent"] == 2 * 70_272
    with pytest.raises(ValueError):
        flops.kv_cache_bytes_per_token(cfg, "int3")


@pytest.mark.parametrize("name", PRESETS)
def test_forward_flops_is_two_active_params_plus_attention(name):
    cfg = ModelConfig.preset(name)
    pc = flops.param_counts(cfg)
    T = 256
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    att = L * 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * (T + 1) / 2
    got = flops.forward_flops_per_token(cfg, T, mtp=False)
    assert got == pytest.approx(2 * pc.active_matmul_per_token + att, rel=1e-12)
    # The matmul part is the parameters a token touches, minus embedding and norms.
    assert 2 * pc.active_matmul_per_token < 2 * pc.active_per_token
    assert flops.train_flops_per_token(cfg, T, mtp=False) == pytest.approx(3 * got)
    assert flops.train_flops_per_step(cfg, 8, T, mtp=False) == pytest.approx(8 * T * 3 * got)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("mtp", [True, False])
@pytest.mark.parametrize("kernels", flops.KERNELS)
def test_step_matmuls_sum_to_the_step_flops(name, mtp, kernels):
    """The bench's floor times these products: their FLOPs are the step's, forward and training, whichever
    way the framework stores its weights."""
    cfg = ModelConfig.preset(name)
    for train, want in ((True, flops.train_flops_per_step), (False, flops.forward_flops_per_step)):
        mms = flops.step_matmuls(cfg, 8, 256, mtp=mtp, train=train, kernels=kernels)
        assert sum(m.flops for m in mms) == pytest.approx(want(cfg, 8, 256, mtp=mtp), rel=1e-12)
        assert len({m.shape for m in mms}) == len(mms)  # equal shapes merged
        assert {m.layout for m in mms} == ({"nn", "nt", "tn"} if train else {"nn", "nt"})
    with pytest.raises(ValueError):
        flops.step_matmuls(cfg, 8, 256, kernels="in-out")


def test_step_matmuls_of_peer_small_by_hand():
    """peer-small, 8 x 256 tokens: each routed expert's balanced share is 2048 * 4 / 16 = 512 rows, its w1 and
    w3 run 16 experts x 3 MoE layers x 2 times a forward; a head's scores cover the causal half of [256, 256]."""
    cfg = ModelConfig.preset("small")
    mms = {m.shape: m for m in flops.step_matmuls(cfg, 8, 256, mtp=False)}
    w13 = mms[(1, 512, 256, 128, "nt")]
    assert w13.count == 96 and w13.what == "routed expert w1/w3"
    assert mms[(1, 128, 512, 256, "tn")].what == "routed expert w1/w3 dW"  # dW[F, D] = dyᵀ · x
    scores = mms[(64, 256, 48, 256, "nt")]  # batch 8 x 8 heads; q·kᵀ over qk_head_dim 48
    assert scores.count == pytest.approx(4 * 257 / 512) and scores.what == "attention scores"
    # Flax kernels [in, out]: a Linear's forward is x·W (nn), its dW = xᵀ·dy [D, F]; the expert loop's dx
    # runs on transposed weights (nn): w1/w3's forward is the same product as w2's dx, and the other way round
    jx = {m.shape: m for m in flops.step_matmuls(cfg, 8, 256, mtp=False, kernels="in_out")}
    assert jx[(1, 512, 256, 128, "nn")].what == "routed expert w1/w3, routed expert w2 dx"
    assert jx[(1, 512, 256, 128, "nn")].count == 96 + 48
    assert jx[(1, 512, 128, 256, "nn")].what == "routed expert w1/w3 dx, routed expert w2"
    assert jx[(1, 256, 512, 128, "tn")].what == "routed expert w1/w3 dW"
    assert jx[(1, 2048, 768, 256, "nt")].what == "dense MLP w1/w3 dx"  # dy·Wᵀ, W [256, 768]
    assert jx[(64, 256, 48, 256, "nt")] == scores  # attention's products do not depend on the kernels


def test_forward_flops_hand_count_tiny():
    """Count every matmul of the tiny preset by hand, one token, window T."""
    c = ModelConfig.preset("tiny")
    D, H, V = 64, 4, 256
    qk, v = 16, 8
    att_mm = D * 32 + 32 * H * qk + D * (16 + 8) + 16 * H * (8 + 8) + H * v * D
    dense = 3 * D * 128
    moe = 8 * D + 3 * 3 * D * 32 + 1 * 3 * D * 32  # router, K=3 experts, 1 shared
    T = 10
    attn = 2 * H * (qk + v) * (T + 1) / 2
    main = 2 * (3 * att_mm + dense + 2 * moe + V * D) + 3 * attn
    assert flops.forward_flops_per_token(c, T, mtp=False) == pytest.approx(main)
    mtp = 2 * (2 * D * D + att_mm + moe + V * D) + attn
    assert flops.forward_flops_per_token(c, T, mtp=True) == pytest.approx(main + mtp)
    assert flops.mtp_flop_share(c, T) == pytest.approx((main + mtp) / main)


def test_causal_attention_grows_with_window():
    cfg = ModelConfig.preset("small")
    a, b = flops.forward_flops_per_token(cfg, 128), flops.forward_flops_per_token(cfg, 4096)
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    assert b - a == pytest.approx(L * 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * (4096 - 128) / 2)


def test_decode_flops_latent_vs_naive():
    cfg = ModelConfig.preset("small")
    n0 = flops.decode_flops_per_token(cfg, 0, "naive")
    l0 = flops.decode_flops_per_token(cfg, 0, "latent")
    assert n0 == l0  # absorption moves wkv_b's FLOPs, it does not remove them
    per_key_naive = flops.decode_flops_per_token(cfg, 1, "naive") - n0
    per_key_latent = flops.decode_flops_per_token(cfg, 1, "latent") - l0
    H, C, R, L = 8, 64, 16, 4
    assert per_key_naive == 2 * H * (48 + 32) * L
    assert per_key_latent == 2 * H * (C + R + C) * L
    with pytest.raises(ValueError):
        flops.decode_flops_per_token(cfg, 1, "paged")


def test_moe_dense_equivalent_width():
    cfg = ModelConfig.preset("small")
    m = flops.moe_layer_flops_per_token(cfg)
    assert m["dense_equivalent_width"] == (4 + 1) * 128
    assert m["experts"] == 2 * 3 * 256 * 640
    assert m["total"] == m["experts"] + 2 * 16 * 256


def test_summary_is_json_ready():
    import json

    s = flops.summary(ModelConfig.preset("tiny"), 32, batch=2)
    json.dumps(s)
    assert s["train_flops_per_step_mtp"] > s["train_flops_per_step"] > 0


def test_causal_query_block():
    """Causal calls of 2 * CAUSAL_QUERY_BLOCK queries or more attend in blocks of CAUSAL_QUERY_BLOCK, or the
    smallest multiple of it that makes at most CAUSAL_MAX_BLOCKS blocks; shorter calls are one block."""
    block, most = flops.CAUSAL_QUERY_BLOCK, flops.CAUSAL_MAX_BLOCKS
    assert (block, most) == (128, 8)  # the figures below
    assert [flops.causal_query_block(S) for S in (1, 255, 256, 300, 1024, 1025, 2048, 4032)] == \
        [1, 255, 128, 128, 128, 256, 256, 512]
    for S in range(2 * block, 5000, 37):
        size = flops.causal_query_block(S)
        assert size % block == 0 and -(-S // size) <= most
        assert size == block or -(-S // (size - block)) > most
