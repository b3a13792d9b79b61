"""dsv3.names and dsv3.checkpoint: the name table, expert stacking, FP8 dequantisation, sharded I/O, errors (framework-free)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3 import checkpoint as ck
from dsv3 import fileio
from dsv3 import names
from dsv3.checkpoint import CheckpointError
from safetensors_fp8 import write_safetensors

TINY = ModelConfig.preset("tiny")


def _random_state(cfg, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in names.canonical_shapes(cfg).items()}



# ------------------------------------------------------------- the name table
def test_canonical_shapes_of_v3_follow_the_reference():
    s = names.canonical_shapes(ModelConfig.preset("v3-671b"))
    assert s["embed.weight"] == s["head.weight"] == (129280, 7168)
    assert s["layers.0.ffn.w1.weight"] == (18432, 7168) and "layers.0.ffn.gate.weight" not in s
    assert s["layers.3.attn.wq_a.weight"] == (1536, 7168)
    assert s["layers.3.attn.wq_b.weight"] == (24576, 1536)
    assert s["layers.3.attn.wkv_a.weight"] == (576, 7168)
    assert s["layers.3.attn.wkv_b.weight"] == (32768, 512)
    assert s["layers.3.attn.wo.weight"] == (7168, 16384)
    assert s["layers.60.ffn.experts.w1"] == (256, 2048, 7168)
    assert s["layers.60.ffn.experts.w2"] == (256, 7168, 2048)
    assert s["layers.60.ffn.gate.bias"] == (256,)
    assert s["mtp.0.eh_proj.weight"] == (7168, 14336)
    assert s["mtp.0.block.ffn.shared_experts.w1.weight"] == (2048, 7168)
    assert not any(k.startswith("layers.61") for k in s)


@pytest.mark.parametrize("hf, canon", [
    ("model.layers.5.mlp.experts.17.gate_proj.weight", "layers.5.ffn.experts.w1"),
    ("model.layers.5.mlp.experts.17.down_proj.weight", "layers.5.ffn.experts.w2"),
    ("model.layers.5.mlp.gate.e_score_correction_bias", "layers.5.ffn.gate.bias"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.attn.wkv_a.weight"),
    ("model.layers.0.self_attn.q_a_layernorm.weight", "layers.0.attn.q_norm.weight"),
    ("model.layers.2.post_attention_layernorm.weight", "layers.2.ffn_norm.weight"),
    ("model.embed_tokens.weight", "embed.weight"),
    ("lm_head.weight", "head.weight"),
    ("model.layers.61.enorm.weight", "mtp.0.enorm.weight"),
    ("model.layers.61.shared_head.norm.weight", "mtp.0.norm.weight"),
    ("model.layers.61.self_attn.o_proj.weight", "mtp.0.block.attn.wo.weight"),
    ("model.layers.61.mlp.experts.255.up_proj.weight", "mtp.0.block.ffn.experts.w3"),
    ("model.layers.61.embed_tokens.weight", None),       # copy of the shared embedding
    ("model.layers.61.shared_head.head.weight", None),   # copy of the shared head
])
def test_hf_names_map_to_canonical_names(hf, canon):
    assert names.hf_to_canonical_name(hf, ModelConfig.preset("v3-671b")) == canon


@pytest.mark.parametrize("bad", ["model.layers.3.mlp.gate.bias", "model.layers.62.enorm.weight",
                                 "transformer.wte.weight", "model.layers.61.shared_head.foo"])
def test_unknown_hf_names_raise_naming_them(bad):
    with pytest.raises(CheckpointError, match=bad.replace(".", r"\.")):
        names.hf_to_canonical_name(bad, ModelConfig.preset("v3-671b"))


def test_canonical_hf_round_trip_stacks_experts_and_adds_mtp_copies():
    state = _random_state(TINY)
    hf = names.canonical_to_hf(state, TINY)
    L = TINY.num_hidden_layers
    assert np.array_equal(hf["model.layers.1.mlp.experts.6.down_proj.weight"], state["layers.1.ffn.experts.w2"][6])
    assert np.array_equal(hf[f"model.layers.{L}.embed_tokens.weight"], state["embed.weight"])
    assert np.array_equal(hf[f"model.layers.{L}.shared_head.head.weight"], state["head.weight"])
    assert np.array_equal(hf[f"model.layers.{L}.eh_proj.weight"], state["mtp.0.eh_proj.weight"])
    back = names.hf_to_canonical(hf, TINY)
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_hf_fused_in_memory_expert_layout_is_split():
    cfg = TINY.replace(num_nextn_predict_layers=0)
    state = _random_state(cfg)
    hf = {k: v for k, v in names.canonical_to_hf(state, cfg).items() if ".experts." not in k}
    for i in (1, 2):
        w1, w3 = state[f"layers.{i}.ffn.experts.w1"], state[f"layers.{i}.ffn.experts.w3"]
        hf[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([w1, w3], axis=1)
        hf[f"model.layers.{i}.mlp.experts.down_proj"] = state[f"layers.{i}.ffn.experts.w2"]
    back = names.hf_to_canonical(hf, cfg)
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_missing_expert_is_named():
    hf = names.canonical_to_hf(_random_state(TINY), TINY)
    del hf["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.2\.ffn\.experts\.w3: experts missing \[5\]"):
        names.hf_to_canonical(hf, TINY)


def test_check_state_names_missing_unexpected_and_misshaped_keys():
    state = _random_state(TINY)
    del state["layers.0.attn.kv_norm.weight"]
    state["layers.9.attn.wo.weight"] = np.zeros(3, np.float32)
    state["norm.weight"] = np.zeros(63, np.float32)
    with pytest.raises(CheckpointError) as err:
        names.check_state(state, TINY)
    msg = str(err.value)
    assert "missing (1): layers.0.attn.kv_norm.weight" in msg
    assert "unexpected (1): layers.9.attn.wo.weight" in msg
    assert "norm.weight: expected (64,), got (63,)" in msg


# --------------------------------------------------------------------- FP8
def _per_element_dequant(q, scale, block):
    out = np.empty(q.shape, np.float32)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c] = np.float32(q[r, c]) * scale[r // block, c // block]
    return out


def _quantize(w, block):
    """Per-block absmax e4m3 quantisation, as DeepSeek's released weights (448 = e4m3 max)."""
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    scale = np.empty((sr, sc), np.float32)
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = np.abs(blk).max() / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).astype(q.dtype)
    return q, scale


@pytest.mark.parametrize("shape, block", [((300, 200), 128), ((128, 256), 128), ((5, 7), 4), ((24, 64), 48)])
def test_fp8_block_dequantisation_matches_per_element_reference(shape, block):
    rng = np.random.default_rng(1)
    q = (rng.standard_normal(shape) * 100).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.5, 2.0, (-(-shape[0] // block), -(-shape[1] // block))).astype(np.float32)
    got = ck.dequantize_fp8_blockwise(q, scale, block)
    assert got.dtype == np.float32
    assert np.array_equal(got, _per_element_dequant(q, scale, block))


def test_fp8_scale_shape_mismatch_is_named():
    q = np.zeros((300, 200), ml_dtypes.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"weight_scale_inv shape \(2, 2\).*expected \(3, 2\)"):
        ck.dequantize_fp8_blockwise(q, np.ones((2, 2), np.float32))


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    cfg = TINY.replace(num_nextn_predict_layers=0)
    block = 48  # ragged edge blocks at these sizes (e.g. wkv_a [24, 64] -> scales [1, 2])
    state = _random_state(cfg)
    ck.save_canonical(str(tmp_path), state, cfg)
    tensors = ck.read_safetensors(str(tmp_path / "model.safetensors"))
    quantised = {}
    for name in list(tensors):
        # every attention and MLP projection; not norms, the router weight or its bias (docs/reference.md §7)
        if (name.endswith(".weight") and (".self_attn." in name or ".mlp." in name)
                and "layernorm" not in name and not name.endswith("mlp.gate.weight")):
            q, s = _quantize(tensors[name], block)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            quantised[name] = (q, s)
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in quantised
    os.remove(tmp_path / "model.safetensors")
    write_safetensors(tmp_path / "model.safetensors", tensors)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    got_cfg, got = ck.load_canonical(str(tmp_path))
    assert got_cfg == cfg and "weight_scale_inv" not in " ".join(got)
    wkv_a = quantised["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert np.array_equal(got["layers.0.attn.wkv_a.weight"], _per_element_dequant(*wkv_a, block))
    q, s = quantised["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert np.array_equal(got["layers.2.ffn.experts.w2"][3], _per_element_dequant(q, s, block))
    # close to the original weights (e4m3 has a 3-bit mantissa) and untouched where not quantised
    assert np.abs(got["layers.0.attn.wo.weight"] - state["layers.0.attn.wo.weight"]).max() < 0.3
    assert np.array_equal(got["layers.1.ffn.gate.weight"], state["layers.1.ffn.gate.weight"])


def test_fp8_weight_without_scale_is_an_error(tmp_path):
    write_safetensors(tmp_path / "model.safetensors",
                       {"model.norm.weight": np.zeros((4, 4), ml_dtypes.float8_e4m3fn)})
    with pytest.raises(CheckpointError, match="FP8 tensors without weight_scale_inv"):
        ck.read_hf_tensors(str(tmp_path))


# ----------------------------------------------------------------- disk I/O
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sharded_save_and_load_round_trip(tmp_path, dtype):
    state = _random_state(TINY, dtype=dtype)
    ck.save_canonical(str(tmp_path), state, TINY, max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert not [f for f in files if f.startswith(".tmp-")]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    cfg, back = ck.load_canonical(str(tmp_path))
    assert cfg == TINY and back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == np.dtype(dtype) and np.array_equal(back[k], state[k]), k


def test_resaving_unsharded_over_a_sharded_checkpoint_loads_the_new_weights(tmp_path):
    old, new = _random_state(TINY, 0), _random_state(TINY, 1)
    ck.save_canonical(str(tmp_path), old, TINY, max_shard_bytes=40_000)
    ck.save_canonical(str(tmp_path), new, TINY)
    _, back = ck.load_canonical(str(tmp_path))
    assert all(np.array_equal(back[k], new[k]) for k in new)


def test_checkpoint_without_mtp_layer_loads_with_zero_depths(tmp_path):
    cfg0 = TINY.replace(num_nextn_predict_layers=0)
    ck.save_canonical(str(tmp_path), _random_state(cfg0), cfg0)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["num_nextn_predict_layers"] = 1  # as in every HF-saved V3 config
    (tmp_path / "config.json").write_text(json.dumps(conf))
    cfg, _ = ck.load_canonical(str(tmp_path))
    assert cfg.num_nextn_predict_layers == 0


def test_partial_mtp_layer_is_an_error(tmp_path):
    state = _random_state(TINY)
    hf = names.canonical_to_hf(state, TINY)
    del hf[f"model.layers.{TINY.num_hidden_layers}.eh_proj.weight"]
    TINY.save_pretrained(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", hf)
    with pytest.raises(CheckpointError, match=r"missing \(1\): mtp\.0\.eh_proj\.weight"):
        ck.load_canonical(str(tmp_path))


def test_empty_directory_is_an_error(tmp_path):
    TINY.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ck.load_canonical(str(tmp_path))


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    fileio.atomic_write_bytes(str(path), b"old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_bytes(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]
