"""ModelConfig: the one place every DeepSeek-V3 hyper-parameter lives (REFERENCE §1).

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
from typing import Any, Optional, Sequence

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
        # alpha; the project's coefficient is `balance_loss_alpha` (REFERENCE §1).
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


class Validator:
    """``need(cond, field, msg)`` raises ValueError naming the dataclass, the field and its value.

    The one validator of the project's configs (ModelConfig, TrainConfig)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __call__(self, cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"{type(self.obj).__name__}.{name}: {msg} (got {getattr(self.obj, name)!r})")

    def integers(self, names: Sequence[str], minimum: int) -> None:
        """Each field an int >= minimum ("positive" for 1, "non-negative" for 0)."""
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        for name in names:
            v = getattr(self.obj, name)
            self(isinstance(v, int) and v >= minimum, name, f"must be {what}")


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
    # MoE (REFERENCE §4)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # MLA (REFERENCE §2); q_lora_rank=None means a direct query projection `wq`.
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE / YaRN (REFERENCE §3); rope_scaling_type None means plain RoPE.
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
    # Multi-token prediction (REFERENCE §6)
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    # Training coefficients (REFERENCE §8.3). Not in the released config.json.
    balance_loss_alpha: float = 1e-4  # alpha of the sequence-wise balance loss
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free bias update
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        need = Validator(self)

        need.integers(("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                       "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                       "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
                       "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                       "max_position_embeddings", "original_max_position_embeddings"), minimum=1)
        need.integers(("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"), minimum=0)
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be None (direct query projection) or a positive integer")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"cannot exceed num_hidden_layers={self.num_hidden_layers}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
             f"must be divisible by n_group={self.n_group}")
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             "each group needs at least 2 experts (a group scores the sum of its top 2)")
        need(self.topk_group <= self.n_group, "topk_group", f"cannot exceed n_group={self.n_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        need(self.num_experts_per_tok <= kept, "num_experts_per_tok",
             f"cannot exceed the {kept} experts in the topk_group={self.topk_group} kept groups")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.rope_scaling_type in (None, "yarn"), "rope_scaling_type", "must be None or 'yarn'")
        need(self.rope_factor >= 1.0, "rope_factor", "must be >= 1")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.balance_loss_alpha >= 0, "balance_loss_alpha", "must be >= 0")
        need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
        need(self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            need(v is None or 0 <= v < self.vocab_size, name, f"must lie in [0, {self.vocab_size})")

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
        """qk_head_dim^-0.5, times mscale^2 under YaRN (REFERENCE §2)."""
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
        """Build from a Hugging Face config.json dict; unknown keys raise."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, fixed in _HF_FIXED_KEYS.items():
            if key in d and d.pop(key) != fixed:
                raise ValueError(f"config.json: {key} must be {fixed!r} for DeepSeek-V3")
        heads = d.get("num_attention_heads")
        kvh = d.pop("num_key_value_heads", heads)
        if kvh != heads:
            raise ValueError(f"config.json: num_key_value_heads={kvh} must equal num_attention_heads={heads} (MLA)")
        rope = d.pop("rope_scaling", None) or {}
        rope = {**rope, **(d.pop("rope_parameters", None) or {})}
        unknown = set(rope) - _ROPE_KEYS
        if unknown:
            raise ValueError(f"config.json: unknown rope_scaling/rope_parameters keys {sorted(unknown)}")
        if rope.get("truncate", True) is not True:
            raise ValueError("config.json: rope truncate=False is not supported")
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        rtype = rope.get("rope_type", rope.get("type"))
        if rtype in (None, "default"):
            kwargs["rope_scaling_type"] = None
        elif rtype == "yarn":
            kwargs["rope_scaling_type"] = "yarn"
            kwargs["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
            factor = rope.get("factor")
            if factor is None:
                factor = d["max_position_embeddings"] / kwargs["original_max_position_embeddings"]
            kwargs["rope_factor"] = float(factor)
            for k, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 0.0), ("mscale_all_dim", 0.0)):
                v = rope.get(k)
                kwargs[k] = float(v) if v is not None else default
        else:
            raise ValueError(f"config.json: rope type {rtype!r} is not supported (only default and yarn)")
        for key in list(d):
            if key in _HF_IGNORED_KEYS:
                d.pop(key)
            elif key in names:
                kwargs[key] = d.pop(key)
        if d:
            raise ValueError(f"config.json: unknown keys {sorted(d)}; refusing to guess their meaning")
        if "rope_theta" in kwargs:
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        for k in ("routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if k in kwargs:
                kwargs[k] = float(kwargs[k])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "config.json"),
                          json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """g(s, mu) = 0.1 mu ln s + 1 for s > 1, else 1 (REFERENCE §2)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


PRESETS: dict[str, ModelConfig] = {
    # Unit tests: every feature on (q LoRA, n_group > topk_group > 1, a dense
    # layer, a shared expert, YaRN with factor > 1, one MTP depth).
    "tiny": ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        rope_factor=4.0, original_max_position_embeddings=32, max_position_embeddings=128,
        num_nextn_predict_layers=1,
    ),
    # CPU training demo: the shape of ../shared/bench/peer-small.json with a
    # byte-level vocabulary (6.55M parameters without MTP).
    "small": ModelConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling_type=None, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    # The published model (REFERENCE §1). Build only abstractly.
    "v3-671b": ModelConfig(),
}
