"""The ONE name table between Hugging Face and canonical tensor names, and the shapes.

The interchange between frameworks is a flat ``{canonical_name: np.ndarray}``
in PyTorch layout (``[out, in]``, routed experts stacked ``[E, out, in]``).
Canonical names are DeepSeek's own short names (REFERENCE §7, "OFF short
names"), with the MTP depth k under ``mtp.{k}.`` and its decoder layer under
``mtp.{k}.block.``:

    embed.weight, norm.weight, head.weight
    layers.{i}.attn_norm.weight, layers.{i}.ffn_norm.weight
    layers.{i}.attn.{wq | wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo}.weight
    layers.{i}.ffn.{w1,w2,w3}.weight                                  (dense layers)
    layers.{i}.ffn.gate.weight, layers.{i}.ffn.gate.bias              (MoE layers)
    layers.{i}.ffn.experts.{w1,w2,w3}                                 ([E, out, in])
    layers.{i}.ffn.shared_experts.{w1,w2,w3}.weight
    mtp.{k}.{enorm,hnorm,eh_proj,norm}.weight, mtp.{k}.block.<as layers.{i}.>

Hugging Face names are per expert, and the MTP depth k is the decoder layer
``model.layers.{num_hidden_layers + k}``, which also stores copies of the
shared embedding and head. File I/O is in `dsv3.checkpoint`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping

import numpy as np

from dsv3.config import ModelConfig

# Within one decoder layer: HF suffix <-> canonical suffix.
_LAYER_TABLE = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn.wq.weight"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight"),
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn.wkv_b.weight"),
    ("self_attn.o_proj.weight", "attn.wo.weight"),
    ("mlp.gate_proj.weight", "ffn.w1.weight"),
    ("mlp.down_proj.weight", "ffn.w2.weight"),
    ("mlp.up_proj.weight", "ffn.w3.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
]
_GLOBAL_TABLE = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "head.weight"),
]
# MTP-only tensors of layer num_hidden_layers + k.
_MTP_TABLE = [
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("shared_head.norm.weight", "norm.weight"),
]
# Copies of the shared embedding and head stored with each MTP layer.
_MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_EXPERT_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_HF_LAYER_TO_CANON = dict(_LAYER_TABLE)
_CANON_LAYER_TO_HF = {c: h for h, c in _LAYER_TABLE}
_HF_GLOBAL_TO_CANON = dict(_GLOBAL_TABLE)
_CANON_GLOBAL_TO_HF = {c: h for h, c in _GLOBAL_TABLE}
_HF_MTP_TO_CANON = dict(_MTP_TABLE)
_CANON_MTP_TO_HF = {c: h for h, c in _MTP_TABLE}

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names every offending key."""


def _layer_block_shapes(cfg: ModelConfig, moe: bool) -> dict[str, tuple]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    s = {"attn_norm.weight": (D,), "ffn_norm.weight": (D,)}
    if cfg.q_lora_rank is None:
        s["attn.wq.weight"] = (H * cfg.qk_head_dim, D)
    else:
        s["attn.wq_a.weight"] = (cfg.q_lora_rank, D)
        s["attn.q_norm.weight"] = (cfg.q_lora_rank,)
        s["attn.wq_b.weight"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
    s["attn.wkv_a.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
    s["attn.kv_norm.weight"] = (cfg.kv_lora_rank,)
    s["attn.wkv_b.weight"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    s["attn.wo.weight"] = (D, H * cfg.v_head_dim)
    if not moe:
        inter = cfg.intermediate_size
        s.update({"ffn.w1.weight": (inter, D), "ffn.w2.weight": (D, inter), "ffn.w3.weight": (inter, D)})
        return s
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    s["ffn.gate.weight"] = (E, D)
    s["ffn.gate.bias"] = (E,)
    s.update({"ffn.experts.w1": (E, F, D), "ffn.experts.w2": (E, D, F), "ffn.experts.w3": (E, F, D)})
    if cfg.n_shared_experts:
        S = cfg.n_shared_experts * F
        s.update({"ffn.shared_experts.w1.weight": (S, D), "ffn.shared_experts.w2.weight": (D, S),
                  "ffn.shared_experts.w3.weight": (S, D)})
    return s


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every canonical tensor name of the model and its shape (torch layout)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple] = {"embed.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        for k, v in _layer_block_shapes(cfg, cfg.is_moe_layer(i)).items():
            out[f"layers.{i}.{k}"] = v
    out["norm.weight"] = (D,)
    out["head.weight"] = (V, D)
    for k in range(cfg.num_nextn_predict_layers):
        out.update({f"mtp.{k}.enorm.weight": (D,), f"mtp.{k}.hnorm.weight": (D,),
                    f"mtp.{k}.eh_proj.weight": (D, 2 * D), f"mtp.{k}.norm.weight": (D,)})
        for n, v in _layer_block_shapes(cfg, True).items():
            out[f"mtp.{k}.block.{n}"] = v
    return out


def check_state(state: Mapping[str, np.ndarray], cfg: ModelConfig, what: str = "state") -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = canonical_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        lines = [f"{what} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


# ------------------------------------------------------------- name mapping
def hf_to_canonical_name(name: str, cfg: ModelConfig) -> str | None:
    """Canonical name of one HF tensor; None for the MTP copies of embed/head.

    Per-expert HF names map to the stacked canonical name (the caller stacks).
    Raises CheckpointError for a name outside the table.
    """
    if name in _HF_GLOBAL_TO_CANON:
        return _HF_GLOBAL_TO_CANON[name]
    m = _LAYER_RE.fullmatch(name)
    if m is None:
        raise CheckpointError(f"unexpected checkpoint key {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    L = cfg.num_hidden_layers
    if i >= L:
        k = i - L
        if k >= cfg.num_nextn_predict_layers:
            raise CheckpointError(f"unexpected checkpoint key {name!r}: layer {i} is beyond the "
                                  f"{L} layers and {cfg.num_nextn_predict_layers} MTP depths")
        if rest in _MTP_COPIES:
            return None
        if rest in _HF_MTP_TO_CANON:
            return f"mtp.{k}.{_HF_MTP_TO_CANON[rest]}"
        prefix = f"mtp.{k}.block."
    else:
        prefix = f"layers.{i}."
    if rest in _HF_LAYER_TO_CANON:
        return prefix + _HF_LAYER_TO_CANON[rest]
    e = _EXPERT_RE.fullmatch(rest)
    if e is not None:
        return f"{prefix}ffn.experts.{_EXPERT_PROJ[e.group(2)]}"
    if rest == "mlp.experts.gate_up_proj":  # HF 5.x fused in-memory layout
        return f"{prefix}ffn.experts.w1+w3"
    if rest == "mlp.experts.down_proj":
        return f"{prefix}ffn.experts.w2"
    raise CheckpointError(f"unexpected checkpoint key {name!r}")


def _canonical_prefix_to_hf(name: str, cfg: ModelConfig) -> tuple[str, str]:
    if name.startswith("layers."):
        i, rest = name.split(".", 2)[1:]
        return f"model.layers.{i}.", rest
    k, rest = name.split(".", 2)[1:]
    return f"model.layers.{cfg.num_hidden_layers + int(k)}.", rest


def canonical_to_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical flat dict -> HF-named dict (experts unstacked, MTP copies added)."""
    out: dict[str, np.ndarray] = {}
    for name, arr in state.items():
        if name in _CANON_GLOBAL_TO_HF:
            out[_CANON_GLOBAL_TO_HF[name]] = arr
            continue
        prefix, rest = _canonical_prefix_to_hf(name, cfg)
        if name.startswith("mtp."):
            if rest in _CANON_MTP_TO_HF:
                out[prefix + _CANON_MTP_TO_HF[rest]] = arr
                continue
            rest = rest[len("block."):]
        if rest.startswith("ffn.experts."):
            proj = {v: k for k, v in _EXPERT_PROJ.items()}[rest.rsplit(".", 1)[1]]
            for e in range(arr.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{proj}.weight"] = arr[e]
        else:
            out[prefix + _CANON_LAYER_TO_HF[rest]] = arr
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        for hf, canon in _MTP_COPIES.items():
            if canon in state:
                out[prefix + hf] = state[canon]
    return out


def hf_to_canonical(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named dict -> canonical flat dict: experts stacked, MTP copies dropped.

    Raises CheckpointError naming unknown keys and missing or duplicated experts.
    """
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    errors: list[str] = []
    for name, arr in tensors.items():
        try:
            canon = hf_to_canonical_name(name, cfg)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if canon is None:
            continue
        parts = name.split(".", 3)  # "model", "layers", i, rest; global names have fewer parts
        e = _EXPERT_RE.fullmatch(parts[3]) if len(parts) == 4 and parts[1] == "layers" else None
        if e is not None:
            experts[canon][int(e.group(1))] = arr
        elif canon.endswith("w1+w3"):
            w1, w3 = np.split(np.asarray(arr), 2, axis=1)
            out[canon.replace("w1+w3", "w1")], out[canon.replace("w1+w3", "w3")] = w1, w3
        else:
            out[canon] = arr
    E = cfg.n_routed_experts
    for canon, per in experts.items():
        absent = sorted(set(range(E)) - set(per))
        extra = sorted(set(per) - set(range(E)))
        if absent or extra:
            errors.append(f"{canon}: experts missing {absent[:10]} / beyond n_routed_experts {extra[:10]}")
            continue
        out[canon] = np.stack([np.asarray(per[e]) for e in range(E)])
    if errors:
        raise CheckpointError("checkpoint keys not understood:\n  " + "\n  ".join(errors[:30]))
    return out


