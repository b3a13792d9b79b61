"""dsv3.config.ModelConfig: validation, derived values, presets, HF config.json in/out (framework-free)."""

import copy
import dataclasses
import json
import math
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3 import ModelConfig
from dsv3.config import PRESETS, yarn_get_mscale

# The released DeepSeek-V3 config.json (transformers 4.x layout, legacy rope_scaling).
RELEASED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_released_config_json_is_the_v3_preset():
    assert ModelConfig.from_hf_dict(RELEASED_V3) == ModelConfig.preset("v3-671b")


def test_v3_derived_values_match_the_reference():
    cfg = ModelConfig.preset("v3-671b")
    assert cfg.qk_head_dim == 192
    assert (cfg.n_moe_layers, cfg.n_router_layers) == (58, 59)
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    m = yarn_get_mscale(40.0, 1.0)
    assert m == pytest.approx(1.3688879454113936, rel=1e-15)
    assert cfg.softmax_scale == pytest.approx(0.1352337788608801, rel=1e-15)
    assert cfg.rope_attention_factor == 1.0
    assert (cfg.balance_loss_alpha, cfg.bias_update_speed, cfg.mtp_loss_weight) == (1e-4, 1e-3, 0.3)


def test_attention_factor_and_scale_without_yarn():
    cfg = ModelConfig.preset("tiny").replace(mscale=0.9, mscale_all_dim=0.6)
    s = cfg.rope_factor
    assert cfg.rope_attention_factor == pytest.approx((0.09 * math.log(s) + 1) / (0.06 * math.log(s) + 1))
    plain = cfg.replace(rope_scaling_type=None)
    assert plain.rope_attention_factor == 1.0
    assert plain.softmax_scale == plain.qk_head_dim ** -0.5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_dict_and_disk(name, tmp_path):
    cfg = ModelConfig.preset(name)
    via_dict = ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    cfg.save_pretrained(tmp_path)
    back = ModelConfig.from_pretrained(tmp_path)
    if cfg.rope_scaling_type is None:  # plain RoPE cannot carry the (unused) YaRN fields
        yarn = dict(rope_factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_max_position_embeddings,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                    mscale_all_dim=cfg.mscale_all_dim)
        via_dict, back = via_dict.replace(**yarn), back.replace(**yarn)
    assert via_dict == cfg
    assert back == cfg


def test_tiny_preset_exercises_every_feature():
    cfg = ModelConfig.preset("tiny")
    assert cfg.q_lora_rank is not None and cfg.n_group > cfg.topk_group > 1
    assert 0 < cfg.first_k_dense_replace < cfg.num_hidden_layers and cfg.n_shared_experts >= 1
    assert cfg.rope_scaling_type == "yarn" and cfg.rope_factor > 1 and cfg.num_nextn_predict_layers == 1
    assert yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim) != 1.0


@pytest.mark.parametrize("field, value, words", [
    ("n_group", 3, "n_routed_experts"),               # 8 experts not divisible by 3 groups
    ("topk_group", 5, "topk_group"),
    ("num_experts_per_tok", 5, "num_experts_per_tok"),  # only 4 experts in the 2 kept groups
    ("q_lora_rank", 0, "q_lora_rank"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("hidden_size", -1, "hidden_size"),
    ("rope_scaling_type", "ntk", "rope_scaling_type"),
    ("eos_token_id", 128, "eos_token_id"),
    ("first_k_dense_replace", 4, "first_k_dense_replace"),
    ("rope_factor", 0.5, "rope_factor"),
    ("num_nextn_predict_layers", -1, "num_nextn_predict_layers"),
])
def test_invalid_values_raise_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{words}"):
        ModelConfig.preset("tiny").replace(**{field: value})


def test_config_is_frozen_and_hashable():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
    assert hash(cfg) == hash(ModelConfig.preset("tiny").replace())
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize("change, words", [
    ({"foo_bar": 1}, r"unknown keys \['foo_bar'\]"),
    ({"scoring_func": "softmax"}, "scoring_func must be 'sigmoid'"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8 must equal"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "alpha": 1}},
     r"unknown rope_scaling/rope_parameters keys \['alpha'\]"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
])
def test_hf_dict_refuses_what_it_does_not_understand(change, words):
    d = {**ModelConfig.preset("tiny").to_hf_dict(), **change}
    if "rope_scaling" in change:
        d.pop("rope_parameters")
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf_dict(d)


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), per=st.integers(2, 4), heads=st.integers(1, 4),
       lora=st.one_of(st.none(), st.integers(4, 16)), factor=st.floats(1.0, 64.0),
       mscale=st.floats(0.1, 1.5), mscale_all=st.floats(0.0, 1.5), data=st.data())
def test_hf_dict_round_trip_property(groups, per, heads, lora, factor, mscale, mscale_all, data):
    E = groups * per
    topk_group = data.draw(st.integers(1, groups))
    k = data.draw(st.integers(1, topk_group * per))
    cfg = ModelConfig.preset("tiny").replace(
        n_routed_experts=E, n_group=groups, topk_group=topk_group, num_experts_per_tok=k,
        num_attention_heads=heads, q_lora_rank=lora, rope_factor=factor, mscale=mscale,
        mscale_all_dim=mscale_all)
    back = ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back == cfg
    assert back.softmax_scale == cfg.softmax_scale and back.rope_attention_factor == cfg.rope_attention_factor


# ------------------------------------------------------------ config.json validation
def _tiny_hf() -> dict:
    return json.loads(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "q_lora_rank",
                                 "num_nextn_predict_layers", "n_shared_experts", "max_position_embeddings"])
def test_missing_size_is_refused_not_replaced_by_the_671b_value(key):
    d = _tiny_hf()
    del d[key]
    with pytest.raises(ValueError, match=rf"config\.json: {key} is required"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("key, default", [("rms_norm_eps", 1e-6), ("initializer_range", 0.02),
                                          ("routed_scaling_factor", 2.5), ("norm_topk_prob", True),
                                          ("bos_token_id", 0), ("eos_token_id", 1),
                                          ("balance_loss_alpha", 1e-4), ("num_key_value_heads", None)])
def test_missing_key_with_a_real_default_takes_it(key, default):
    d = _tiny_hf()
    del d[key]
    cfg = ModelConfig.from_hf_dict(d)
    if default is not None:
        assert getattr(cfg, key) == default


@pytest.mark.parametrize("key, value, words", [
    ("norm_topk_prob", "false", "must be a boolean \\(true or false\\)"),
    ("n_shared_experts", True, "must be a non-negative integer"),
    ("hidden_size", 64.0, "must be a positive integer"),
    ("routed_scaling_factor", math.inf, "must be a finite number > 0"),
    ("routed_scaling_factor", math.nan, "must be a finite number > 0"),
    ("initializer_range", -1, "must be a finite number > 0"),
    ("rms_norm_eps", 0.0, "must be a finite number > 0"),
    ("rope_theta", 10 ** 400, "must be a finite number > 1"),
    ("balance_loss_alpha", "0.001", "must be a finite number >= 0"),
    ("eos_token_id", [1, 2], "must be None \\(null\\) or a non-negative integer"),
    ("q_lora_rank", False, "must be None \\(null\\) or a positive integer"),
])
def test_wrong_json_type_or_range_is_refused_naming_the_key(key, value, words):
    d = _tiny_hf()
    d[key] = value
    if key == "rope_theta":
        d["rope_parameters"].pop("rope_theta")
    with pytest.raises(ValueError, match=rf"config\.json: {key}: {words} \(got "):
        ModelConfig.from_hf_dict(d)


def test_head_dim_and_qk_head_dim_are_checked_against_the_model():
    d = {**_tiny_hf(), "head_dim": 8, "qk_head_dim": 16}  # as transformers writes them: R and N + R
    assert ModelConfig.from_hf_dict(d) == ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"config\.json: head_dim=999 must equal qk_rope_head_dim=8"):
        ModelConfig.from_hf_dict({**d, "head_dim": 999})
    with pytest.raises(ValueError, match=r"qk_head_dim=8 must equal qk_nope_head_dim \+ qk_rope_head_dim=16"):
        ModelConfig.from_hf_dict({**d, "qk_head_dim": 8})
    with pytest.raises(ValueError, match=r"config\.json: head_dim: must be a positive integer"):
        ModelConfig.from_hf_dict({**d, "head_dim": "8"})


def test_fixed_keys_compare_type_as_well_as_value():
    for key, value in (("moe_layer_freq", True), ("moe_layer_freq", 1.0), ("attention_bias", 0),
                       ("rope_interleave", None)):
        with pytest.raises(ValueError, match=rf"config\.json: {key} must be"):
            ModelConfig.from_hf_dict({**_tiny_hf(), key: value})


@pytest.mark.parametrize("rope, words", [
    ({"type": "yarn", "factor": 4}, r"rope_scaling\.original_max_position_embeddings is required"),
    ({"type": "yarn", "factor": "4", "original_max_position_embeddings": 32},
     r"rope_scaling\.factor: must be a finite number >= 1"),
    ({"type": "yarn", "factor": 4, "original_max_position_embeddings": 32.0},
     r"rope_scaling\.original_max_position_embeddings: must be a positive integer"),
    ({"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": None, "mscale": -1},
     r"rope_scaling\.mscale: must be a finite number >= 0"),
    ({"type": "yarn", "original_max_position_embeddings": 256},  # factor = 128 / 256
     r"rope_scaling\.factor is absent, so YaRN takes max_position_embeddings / original_max_position_embeddings"),
    ({"type": 3}, r"rope_scaling\.type: rope type 3 is not supported"),
    ({"type": "yarn", "rope_type": "default"}, r"rope_scaling\.type='yarn' differs from rope_scaling\.rope_type"),
    ({"factor": 4, "original_max_position_embeddings": 32},
     r"rope_scaling\.factor is a YaRN setting, but the rope type \(rope_type or type\) is absent"),
    ({"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "truncate": False},
     r"rope_scaling\.truncate: only true is supported"),
    ({"rope_theta": 500.0}, r"rope_theta=10000.0 differs from rope_scaling\.rope_theta=500.0"),
    ([4, 32], r"rope_scaling must be null or a JSON object"),
])
def test_rope_scaling_fields_are_complete_and_typed(rope, words):
    d = {**_tiny_hf(), "rope_scaling": rope}
    d.pop("rope_parameters")
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf_dict(d)


def test_legacy_rope_scaling_and_rope_parameters_must_agree():
    d = _tiny_hf()
    assert ModelConfig.from_hf_dict({**d, "rope_scaling": {"type": "yarn", "factor": 4.0}}) \
        == ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"rope_parameters\.factor=4\.0 differs from rope_scaling\.factor=8"):
        ModelConfig.from_hf_dict({**d, "rope_scaling": {"type": "yarn", "factor": 8}})


@pytest.mark.parametrize("key", ["rope_factor", "original_max_position_embeddings", "rope_scaling_type"])
def test_rope_fields_are_not_top_level_config_json_keys(key):
    with pytest.raises(ValueError, match=rf"unknown keys \['{key}'\]"):
        ModelConfig.from_hf_dict({**_tiny_hf(), key: 8})


@pytest.mark.parametrize("doc", [[1, 2], "config", 3, None, True])
def test_a_config_json_that_is_not_an_object_is_refused(doc, tmp_path):
    with pytest.raises(ValueError, match=rf"config\.json: must be a JSON object of settings \(got {type(doc).__name__}\)"):
        ModelConfig.from_hf_dict(doc)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="must be a JSON object"):
        ModelConfig.from_pretrained(tmp_path)


def test_a_config_json_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, words", [
    ("norm_topk_prob", "false", "must be a boolean \\(true or false\\)"),
    ("n_shared_experts", True, "must be a non-negative integer"),
    ("hidden_size", 64.0, "must be a positive integer"),
    ("routed_scaling_factor", math.inf, "must be a finite number > 0"),
    ("initializer_range", -1, "must be a finite number > 0"),
    ("balance_loss_alpha", "1e-4", "must be a finite number >= 0"),
    ("mtp_loss_weight", None, "must be a finite number >= 0"),
    ("beta_slow", 0, "must be a finite number > 0"),
    ("rope_theta", 1.0, "must be a finite number > 1"),
    ("eos_token_id", -1, "must be None \\(null\\) or a non-negative integer"),
    ("rope_scaling_type", ["yarn"], "must be None or 'yarn'"),
])
def test_direct_construction_checks_the_same_types(field, value, words):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: {words} \(got "):
        ModelConfig.preset("tiny").replace(**{field: value})


# ------------------------------------------------ config.json fuzz with an independent oracle
# The oracle restates, from the HF config.json format and the architecture, which documents are
# valid. It shares no code with dsv3.config.
_REQUIRED = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "first_k_dense_replace", "num_nextn_predict_layers", "num_attention_heads", "q_lora_rank",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
             "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"}
_POSITIVE_INT = {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                 "original_max_position_embeddings", "num_key_value_heads", "head_dim", "qk_head_dim"}
_NONNEG_INT = {"n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"}
_NULL_OR = {"q_lora_rank": 1, "bos_token_id": 0, "eos_token_id": 0}  # None, or an int >= this
_REAL_ABOVE = {"routed_scaling_factor": 0, "rms_norm_eps": 0, "initializer_range": 0, "beta_fast": 0,
               "beta_slow": 0, "rope_theta": 1}
_REAL_AT_LEAST = {"factor": 1, "mscale": 0, "mscale_all_dim": 0, "balance_loss_alpha": 0,
                  "bias_update_speed": 0, "mtp_loss_weight": 0}
_FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "hidden_act": "silu",
          "attention_bias": False, "tie_word_embeddings": False, "rope_interleave": True}
_METADATA = {"architectures", "model_type", "auto_map", "torch_dtype", "transformers_version", "use_cache",
             "quantization_config", "pretraining_tp", "attention_dropout", "aux_loss_alpha", "seq_aux", "ep_size"}
_YARN_ONLY = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}


def _real(v):
    if type(v) not in (int, float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _value_ok(key, v):
    if key in _POSITIVE_INT:
        return type(v) is int and v > 0
    if key in _NONNEG_INT:
        return type(v) is int and v >= 0
    if key in _NULL_OR:
        return v is None or (type(v) is int and v >= _NULL_OR[key])
    if key == "norm_topk_prob":
        return type(v) is bool
    if key in _REAL_ABOVE:
        return _real(v) is not None and _real(v) > _REAL_ABOVE[key]
    if key in _REAL_AT_LEAST:
        return _real(v) is not None and _real(v) >= _REAL_AT_LEAST[key]
    if key in _FIXED:
        return type(v) is type(_FIXED[key]) and v == _FIXED[key]
    if key in ("type", "rope_type"):
        return v in ("default", "yarn") and type(v) is str
    if key == "truncate":
        return v is True
    assert key in _METADATA, key
    return True


def _oracle_valid(d) -> bool:
    """Is `d` a DeepSeek-V3 config.json this project must accept?"""
    if type(d) is not dict or not _REQUIRED <= set(d):
        return False
    d = {k: v for k, v in d.items() if not (k == "num_key_value_heads" and v is None)}
    if not all(_value_ok(k, v) for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")):
        return False
    if any(k in d and d[k] != want for k, want in (
            ("num_key_value_heads", d["num_attention_heads"]), ("head_dim", d["qk_rope_head_dim"]),
            ("qk_head_dim", d["qk_nope_head_dim"] + d["qk_rope_head_dim"]))):
        return False
    rope = {}
    for src in ("rope_scaling", "rope_parameters"):
        part = d.get(src)
        if part is None:
            continue
        if type(part) is not dict:
            return False
        for k, v in part.items():
            if v is None:
                continue
            if not _value_ok(k, v) or (k in rope and rope[k] != v):
                return False
            rope[k] = v
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        return False
    if "rope_theta" in rope and "rope_theta" in d and float(rope["rope_theta"]) != float(d["rope_theta"]):
        return False
    if rope.get("rope_type", rope.get("type")) == "yarn":
        if "original_max_position_embeddings" not in rope:
            return False
        if "factor" not in rope and d["max_position_embeddings"] < rope["original_max_position_embeddings"]:
            return False
    elif _YARN_ONLY & set(rope):
        return False
    E, G, TG = d["n_routed_experts"], d["n_group"], d["topk_group"]
    return (d["first_k_dense_replace"] <= d["num_hidden_layers"] and d["qk_rope_head_dim"] % 2 == 0
            and E % G == 0 and E // G >= 2 and TG <= G and d["num_experts_per_tok"] <= TG * (E // G)
            and all(d.get(k, 0) is None or d.get(k, 0) < d["vocab_size"] for k in ("bos_token_id", "eos_token_id")))


_FUZZ_BASES = {
    "small (plain RoPE)": json.loads(json.dumps(ModelConfig.preset("small").to_hf_dict())),
    # q LoRA + YaRN + groups, with the derived keys transformers writes
    "tiny (HF 5 layout)": {**json.loads(json.dumps(ModelConfig.preset("tiny").to_hf_dict())),
                           "head_dim": 8, "qk_head_dim": 16},
    "released V3 (legacy rope_scaling)": RELEASED_V3,
    # both spellings of the rope settings, agreeing
    "tiny (rope_scaling and rope_parameters)": {
        **json.loads(json.dumps(ModelConfig.preset("tiny").to_hf_dict())),
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "mscale": 1.0}},
}
_ODD_VALUES = st.one_of(
    st.text(max_size=6), st.booleans(), st.lists(st.integers(0, 3), max_size=2), st.none(), st.just({}),
    st.floats(-1e3, 1e3), st.integers(-3, 300),
    st.sampled_from([0, -1, 0.0, -0.5, math.inf, -math.inf, math.nan, 10 ** 12, -10 ** 12, 10 ** 400, 1e300,
                     "yarn", "default", "silu", "sigmoid"]),
)


def _mutations(base):
    path = st.sampled_from(_paths(base))
    nudge = st.sampled_from(["double", "plus2", "minus2", "half"])
    return st.lists(st.tuples(path, st.one_of(st.just(("delete",)), st.tuples(st.just("set"), _ODD_VALUES),
                                              st.tuples(st.just("nudge"), nudge))), min_size=1, max_size=3)


def _apply(d, path, op):
    """Apply one mutation in place; the name it touches, or None where the path is gone."""
    parent = d if len(path) == 1 else d.get(path[0])
    if type(parent) is not dict or (op[0] != "set" and path[-1] not in parent):
        return None
    key = path[-1]
    if op[0] == "delete":
        del parent[key]
    elif op[0] == "set":
        parent[key] = op[1]
    else:
        v = parent[key]
        if type(v) not in (int, float):
            return None
        half = v // 2 if type(v) is int else v / 2
        parent[key] = {"double": v * 2, "plus2": v + 2, "minus2": v - 2, "half": half}[op[1]]
    return key


_SWEEP_OPS = [("delete",)] + [("nudge", n) for n in ("double", "plus2", "minus2", "half")] + [
    ("set", v) for v in ("x", "", "yarn", "default", True, False, [], [1], None, {}, 0, 1, 2, -1, 0.5, 1.0,
                         1.5, -0.0, math.inf, -math.inf, math.nan, 10 ** 12, -10 ** 12, 10 ** 400, 1e300)]


def _paths(base):
    return sorted([(k,) for k in base] + [(src, k) for src in ("rope_scaling", "rope_parameters")
                                          for k in base.get(src, {})])


def _names(msg, names):
    return [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", msg)]


def _outcome(d, touched):
    """"loaded" / "refused", or the AssertionError text where from_hf_dict and the oracle disagree."""
    valid = _oracle_valid(d)
    doc = json.loads(json.dumps(d))  # as read from disk (json keeps NaN/Infinity)
    try:
        cfg = ModelConfig.from_hf_dict(doc)
    except ValueError as e:
        assert not valid, f"valid config refused after mutating {sorted(touched)}: {e}"
        assert _names(str(e), touched), f"message names none of {sorted(touched)}: {e}"
        return "refused"
    assert valid, f"invalid config accepted after mutating {sorted(touched)}: {d}"
    for key in touched & {f.name for f in dataclasses.fields(ModelConfig)}:
        if key in d and d[key] is not None:  # what config.json says is what the model gets
            assert getattr(cfg, key) == d[key], key
    return "loaded"


@pytest.mark.parametrize("base_name", sorted(_FUZZ_BASES))
def test_config_json_every_single_mutation_refuses_with_the_field_name_or_loads(base_name):
    """Every key (nested rope keys too) x every mutation of _SWEEP_OPS, one at a time."""
    base, seen = _FUZZ_BASES[base_name], Counter()
    for path in _paths(base):
        for op in _SWEEP_OPS:
            d = copy.deepcopy(base)
            name = _apply(d, path, op)
            if name is not None:
                seen[_outcome(d, {name})] += 1
    print(f"config.json sweep [{base_name}]: {sum(seen.values())} cases, "
          f"{seen['loaded']} loaded, {seen['refused']} refused")
    assert seen["loaded"] >= 100 and seen["refused"] >= 500, seen


def test_config_json_fuzz_refuses_with_the_field_name_or_loads():
    """One to three mutations at once (deleted keys, swapped types, out-of-range values, nudged
    numbers): a ValueError naming a mutated key, or a config that loads exactly when the oracle says
    it is valid; never another exception."""
    seen = Counter()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(data=st.data(), base_name=st.sampled_from(sorted(_FUZZ_BASES)))
    def one_case(data, base_name):
        base = _FUZZ_BASES[base_name]
        d = copy.deepcopy(base)
        touched = {name for path, op in data.draw(_mutations(base)) if (name := _apply(d, path, op))}
        seen[_outcome(d, touched)] += 1

    one_case()
    print(f"config.json fuzz: {sum(seen.values())} cases, {seen['loaded']} loaded, {seen['refused']} refused")
    assert seen["loaded"] >= 30 and seen["refused"] >= 100, seen
