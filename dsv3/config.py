"""ModelConfig: the one place every DeepSeek-V3 hyper-parameter lives (docs/reference.md §1).

Field names follow the Hugging Face ``config.json`` keys, so a reader who knows
the released checkpoint knows this file. The config is a frozen, hashable
dataclass (usable as a static argument under ``jax.jit``) that validates itself
and names the offending field in every error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from dsv3.fileio import atomic_write_text

# Keys of a Hugging Face DeepSeek-V3 config.json that this project knows but does
# not model. Each is either metadata or a value the architecture fixes; the
# fixed ones are checked in `from_hf_dict` instead of being silently accepted.
_HF_IGNORED_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version",
        "dtype", "torch_dtype", "use_cache", "return_dict", "output_attentions",
        "output_hidden_states", "output_router_logits", "id2label", "label2id",
        "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "pad_token_id",
        "pretraining_tp", "attention_dropout",
        # Derived from the fields we keep (checked for consistency below).
        "qk_head_dim", "head_dim",
        # V2-era balance-loss keys. V3's released value (0.001) is not the Paper's
        # alpha; the project's coefficient is `balance_loss_alpha` (docs/reference.md §1).
        "aux_loss_alpha", "seq_aux",
        # Deployment: expert parallel size.
        "ep_size",
        # Handled by dsv3.checkpoint (FP8 dequantisation at load time).
        "quantization_config",
    }
)

# Keys whose only legal value is fixed by the DeepSeek-V3 architecture.
_HF_FIXED_KEYS = {
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "rope_interleave": True,
}

_ROPE_KEYS = frozenset(
    {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
     "beta_slow", "mscale", "mscale_all_dim", "rope_theta", "truncate"}
)
# The rope keys that only YaRN reads.
_YARN_KEYS = frozenset(
    {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
)
# ModelConfig fields a config.json carries inside rope_scaling / rope_parameters, never at top level.
_ROPE_FIELDS = frozenset(
    {"rope_scaling_type", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
     "mscale", "mscale_all_dim"}
)

# What every DeepSeek-V3 config.json states: sizes, layer counts, vocabulary, heads, ranks and
# expert counts. transformers defaults each of them to the 671B value, so a config.json that
# lacks one would silently describe a different model; from_hf_dict refuses it instead. The other
# keys keep their Hugging Face default (rms_norm_eps, rope_theta, initializer_range,
# routed_scaling_factor, norm_topk_prob, bos/eos, num_key_value_heads) or the project's
# (balance_loss_alpha, bias_update_speed, mtp_loss_weight, which config.json never has).
_HF_REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_nextn_predict_layers", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
)


@dataclass(frozen=True)
class _Rule:
    """The type and range one setting must have.

    kind: "int" (a Python/JSON integer, not a bool), "real" (an int or float, not a bool, finite)
    or "bool" (true/false). A number must be > low (low_open) or >= low, and < high (high_open)
    or <= high; nullable admits None.
    """

    kind: str
    low: Optional[float] = None
    low_open: bool = True
    nullable: bool = False
    high: Optional[float] = None
    high_open: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            what = "a boolean (true or false)"
        elif self.high is not None:  # an interval, e.g. "a finite number in [0, 1)"
            lo = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
            what = (f"{'an integer' if self.kind == 'int' else 'a finite number'} in "
                    f"{lo}, {self.high:g}{')' if self.high_open else ']'}")
        elif self.kind == "int":
            what = "an integer" if self.low is None else {
                (0, True): "a positive integer", (0, False): "a non-negative integer"}.get(
                (self.low, self.low_open), f"an integer {'>' if self.low_open else '>='} {self.low}")
        else:
            what = "a finite number" + ("" if self.low is None else
                                        f" {'>' if self.low_open else '>='} {self.low:g}")
        return ("None (null) or " if self.nullable else "") + what

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` breaks the rule ("must be ..."), or None when it is fine."""
        if value is None and self.nullable:
            return None
        bad = f"must be {self.describe()}"
        if self.kind == "bool":
            return None if isinstance(value, bool) else bad
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return bad
        if self.kind == "int" and not isinstance(value, int):
            return bad
        if self.kind == "real":
            try:
                if not math.isfinite(float(value)):
                    return bad
            except OverflowError:  # an integer beyond the float range
                return bad
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return bad
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return bad
        return None


_POS_INT, _NONNEG_INT = _Rule("int", 0), _Rule("int", 0, low_open=False)
_POS_REAL, _NONNEG_REAL = _Rule("real", 0), _Rule("real", 0, low_open=False)

# One rule per setting, shared by ModelConfig.__post_init__ (the dataclass fields) and
# from_hf_dict (the same keys in config.json, plus the keys only config.json has).
_RULES: dict[str, _Rule] = {
    **{name: _POS_INT for name in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        "original_max_position_embeddings", "num_key_value_heads", "head_dim", "qk_head_dim")},
    **{name: _NONNEG_INT for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")},
    "q_lora_rank": _Rule("int", 0, nullable=True),  # None: a direct query projection wq
    "bos_token_id": _Rule("int", 0, low_open=False, nullable=True),
    "eos_token_id": _Rule("int", 0, low_open=False, nullable=True),
    "norm_topk_prob": _Rule("bool"),
    **{name: _POS_REAL for name in (
        "routed_scaling_factor", "rms_norm_eps", "initializer_range", "beta_fast", "beta_slow")},
    # RoPE frequencies theta^(-2i/R) must fall with i; YaRN divides by ln(theta).
    "rope_theta": _Rule("real", 1),
    "rope_factor": _Rule("real", 1, low_open=False),
    **{name: _NONNEG_REAL for name in (
        "mscale", "mscale_all_dim", "balance_loss_alpha", "bias_update_speed", "mtp_loss_weight")},
}


def _check(where: str, name: str, value: Any, rule: Optional[_Rule] = None) -> None:
    """Raise ValueError "<where><name>: must be ... (got value)" unless `value` obeys the rule."""
    problem = (rule or _RULES[name]).problem(value)
    if problem is not None:
        raise ValueError(f"{where}{name}: {problem} (got {value!r})")


class Validator:
    """``need(cond, field, msg)`` raises ValueError naming the dataclass, the field and its value.

    The one validator of the project's configs (ModelConfig, TrainConfig)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __call__(self, cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"{type(self.obj).__name__}.{name}: {msg} (got {getattr(self.obj, name)!r})")


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture and its training coefficients.

    Shapes in the model code use: D = hidden_size, H = num_attention_heads,
    C = kv_lora_rank, R = qk_rope_head_dim, E = n_routed_experts,
    K = num_experts_per_tok, F = moe_intermediate_size, V = vocab_size.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed / shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    # MoE (docs/reference.md §4)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # MLA (docs/reference.md §2); q_lora_rank=None means a direct query projection `wq`.
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE / YaRN (docs/reference.md §3); rope_scaling_type None means plain RoPE.
    rope_theta: float = 10000.0
    rope_scaling_type: Optional[str] = "yarn"
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    # Multi-token prediction (docs/reference.md §6)
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    # Training coefficients (docs/reference.md §8.3). Not in the released config.json.
    balance_loss_alpha: float = 1e-4  # alpha of the sequence-wise balance loss
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free bias update
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        need = Validator(self)

        for f in dataclasses.fields(self):  # types and ranges (rules shared with from_hf_dict)
            if f.name in _RULES:
                _check("ModelConfig.", f.name, getattr(self, f.name))
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"cannot exceed num_hidden_layers={self.num_hidden_layers}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
             f"must be divisible by n_group={self.n_group}")
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             f"each group needs at least 2 of the n_routed_experts={self.n_routed_experts} experts "
             "(a group scores the sum of its top 2)")
        need(self.topk_group <= self.n_group, "topk_group", f"cannot exceed n_group={self.n_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        need(self.num_experts_per_tok <= kept, "num_experts_per_tok",
             f"cannot exceed the {kept} experts in the topk_group={self.topk_group} kept groups "
             f"(n_routed_experts={self.n_routed_experts} in n_group={self.n_group} groups)")
        need(self.rope_scaling_type is None or (isinstance(self.rope_scaling_type, str)
                                                and self.rope_scaling_type == "yarn"),
             "rope_scaling_type", "must be None or 'yarn'")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            need(v is None or v < self.vocab_size, name, f"must lie in [0, vocab_size={self.vocab_size})")

    # ---------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        """MoE layers of the main model (MTP blocks not included)."""
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def n_router_layers(self) -> int:
        """All routers: main MoE layers first, then one per MTP depth."""
        return self.n_moe_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (docs/reference.md §2)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling_type == "yarn" and self.mscale_all_dim:
            m = yarn_get_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Factor applied to cos/sin under YaRN (HF `attention_factor`; 1.0 for V3)."""
        if self.rope_scaling_type != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return float(yarn_get_mscale(self.rope_factor, self.mscale)
                         / yarn_get_mscale(self.rope_factor, self.mscale_all_dim))
        return yarn_get_mscale(self.rope_factor)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- presets
    @staticmethod
    def preset(name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    # ------------------------------------------------------------- HF config
    def to_hf_dict(self) -> dict:
        """The Hugging Face config.json dict (transformers 5.x layout)."""
        d: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            if f.name in ("rope_scaling_type", "rope_factor", "original_max_position_embeddings",
                          "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "rope_theta"):
                continue
            d[f.name] = getattr(self, f.name)
        d.update(num_key_value_heads=self.num_attention_heads, hidden_act="silu",
                 attention_bias=False, tie_word_embeddings=False, scoring_func="sigmoid",
                 topk_method="noaux_tc", rope_interleave=True, rope_theta=self.rope_theta)
        rope: dict[str, Any] = {"rope_theta": self.rope_theta}
        if self.rope_scaling_type == "yarn":
            rope.update(rope_type="yarn", type="yarn", factor=self.rope_factor,
                        original_max_position_embeddings=self.original_max_position_embeddings,
                        beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                        mscale=self.mscale, mscale_all_dim=self.mscale_all_dim)
        else:
            rope.update(rope_type="default")
        d["rope_parameters"] = rope
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict.

        Refuses, with a ValueError naming the key: a non-object, unknown keys, a missing
        required key (`_HF_REQUIRED_KEYS`; no 671B defaults), a value of the wrong JSON type
        or out of range, a fixed key with another value, and derived keys (num_key_value_heads,
        head_dim, qk_head_dim) that disagree with the fields the model uses.
        """
        where = "config.json: "
        if not isinstance(d, dict):
            raise ValueError(f"{where}must be a JSON object of settings (got {type(d).__name__})")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - _ROPE_FIELDS
        known = names | _HF_IGNORED_KEYS | set(_HF_FIXED_KEYS) | {"num_key_value_heads", "rope_scaling",
                                                                  "rope_parameters"}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ValueError(f"{where}unknown keys {unknown}; refusing to guess their meaning")
        for key, fixed in _HF_FIXED_KEYS.items():
            if key in d and not (type(d[key]) is type(fixed) and d[key] == fixed):
                raise ValueError(f"{where}{key} must be {fixed!r} for DeepSeek-V3 (got {d[key]!r})")
        for key in _HF_REQUIRED_KEYS:
            if key not in d:
                raise ValueError(f"{where}{key} is required (every DeepSeek-V3 config.json states it; "
                                 "no default is assumed)")
        if d.get("num_key_value_heads") is None:  # HF: null means num_attention_heads
            d.pop("num_key_value_heads", None)
        for key in d:
            if key in _RULES:
                _check(where, key, d[key])
        heads = d["num_attention_heads"]
        derived = {"num_key_value_heads": ("num_attention_heads", heads, "MLA"),
                   "head_dim": ("qk_rope_head_dim", d["qk_rope_head_dim"], "HF's head_dim is the RoPE width"),
                   "qk_head_dim": ("qk_nope_head_dim + qk_rope_head_dim",
                                   d["qk_nope_head_dim"] + d["qk_rope_head_dim"], "the query/key head width")}
        for key, (what, want, why) in derived.items():
            if key in d and d[key] != want:
                raise ValueError(f"{where}{key}={d[key]} must equal {what}={want} ({why})")

        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        kwargs.update(cls._rope_from_hf(d, where))
        for k, v in kwargs.items():  # JSON integers in real-valued fields become floats
            if v is not None and _RULES.get(k, _POS_INT).kind == "real":
                kwargs[k] = float(v)
        return cls(**kwargs)

    @staticmethod
    def _rope_entries(d: dict, where: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The checked keys of config.json's rope_scaling and rope_parameters, merged (they must agree),
        and for each key the "source.key" it came from."""
        rope: dict[str, Any] = {}
        source: dict[str, str] = {}
        for src in ("rope_scaling", "rope_parameters"):
            part = d.get(src)
            if part is None:
                continue
            if not isinstance(part, dict):
                raise ValueError(f"{where}{src} must be null or a JSON object (got {part!r})")
            unknown = sorted(set(part) - _ROPE_KEYS, key=str)
            if unknown:
                raise ValueError(f"{where}unknown rope_scaling/rope_parameters keys {unknown}")
            for k, v in part.items():
                if v is None:  # null: as if absent
                    continue
                name = f"{src}.{k}"
                if k in ("type", "rope_type"):
                    if not (isinstance(v, str) and v in ("default", "yarn")):
                        raise ValueError(f"{where}{name}: rope type {v!r} is not supported "
                                         "(only 'default' and 'yarn')")
                elif k == "truncate":
                    if v is not True:
                        raise ValueError(f"{where}{name}: only true is supported (got {v!r})")
                else:
                    _check(where, name, v, _RULES["rope_factor" if k == "factor" else k])
                if k in rope and rope[k] != v:
                    raise ValueError(f"{where}{name}={v!r} differs from {source[k]}={rope[k]!r}")
                rope[k], source[k] = v, name
        if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
            raise ValueError(f"{where}{source['type']}={rope['type']!r} differs from "
                             f"{source['rope_type']}={rope['rope_type']!r}")
        return rope, source

    @staticmethod
    def _rope_from_hf(d: dict, where: str) -> dict[str, Any]:
        """ModelConfig rope fields from config.json's rope_theta, rope_scaling and rope_parameters."""
        rope, source = ModelConfig._rope_entries(d, where)
        kwargs: dict[str, Any] = {}
        if "rope_theta" in rope:
            if "rope_theta" in d and float(d["rope_theta"]) != float(rope["rope_theta"]):
                raise ValueError(f"{where}rope_theta={d['rope_theta']!r} differs from "
                                 f"{source['rope_theta']}={rope['rope_theta']!r}")
            kwargs["rope_theta"] = rope["rope_theta"]
        rtype = rope.get("rope_type", rope.get("type"))
        if rtype != "yarn":
            extra = sorted(set(rope) & _YARN_KEYS)
            if extra:
                raise ValueError(f"{where}{source[extra[0]]} is a YaRN setting, but the rope type "
                                 f"(rope_type or type) is {repr(rtype) if rtype else 'absent'} "
                                 f"(set it to 'yarn' or remove {extra})")
            kwargs["rope_scaling_type"] = None
            return kwargs
        if "original_max_position_embeddings" not in rope:
            src = source.get("rope_type", source.get("type", "rope_parameters.rope_type")).split(".")[0]
            raise ValueError(f"{where}{src}.original_max_position_embeddings is required when the rope_type "
                             "is 'yarn'")
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor")
        if factor is None:  # HF: the whole context over the pre-YaRN context
            factor = d["max_position_embeddings"] / original
            if factor < 1:
                src = source["original_max_position_embeddings"].split(".")[0]
                raise ValueError(f"{where}{src}.factor is absent, so YaRN takes max_position_embeddings / "
                                 f"original_max_position_embeddings = {factor:g}, which must be >= 1")
        kwargs.update(rope_scaling_type="yarn", original_max_position_embeddings=original, rope_factor=factor)
        for k, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 0.0), ("mscale_all_dim", 0.0)):
            kwargs[k] = rope.get(k, default)
        return kwargs

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "config.json"),
                          json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """g(s, mu) = 0.1 mu ln s + 1 for s > 1, else 1 (docs/reference.md §2)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


PRESETS: dict[str, ModelConfig] = {
    # Unit tests: every feature on (q LoRA, n_group > topk_group > 1, a dense
    # layer, a shared expert, YaRN with factor > 1, one MTP depth). A byte vocabulary and
    # 256 positions, so `dsv3 train --preset tiny` trains with the default --seq-len 256.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        rope_factor=4.0, original_max_position_embeddings=32, max_position_embeddings=256,
        num_nextn_predict_layers=1,
    ),
    # CPU training demo: the shape of docs/bench/peer-small.json with a
    # byte-level vocabulary (6.55M parameters without MTP).
    "small": ModelConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling_type=None, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    # The bench's larger work (`dsv3 bench --preset medium`): matmuls nearer a CPU's peak shapes, V3's
    # routing shape scaled down (64 routed experts, top-6 in 8 groups of which 4 are kept), one MTP depth.
    "medium": ModelConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        rope_scaling_type=None, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    # The published model (docs/reference.md §1). Build only abstractly.
    "v3-671b": ModelConfig(),
}
