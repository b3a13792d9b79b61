"""Hugging Face transformers 5.24 DeepSeek-V3 as a test oracle (docs/reference.md §9.2.2).

Always pinned to attn_implementation="eager" and experts_implementation="eager".
"""

from __future__ import annotations

import torch
import transformers

from dsv3 import ModelConfig

_OURS_ONLY = ("architectures", "model_type", "balance_loss_alpha", "bias_update_speed", "mtp_loss_weight")
EAGER = dict(attn_implementation="eager", experts_implementation="eager")


def hf_config(cfg: ModelConfig) -> transformers.DeepseekV3Config:
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in _OURS_ONLY}
    return transformers.DeepseekV3Config(**d)


def make_hf(cfg: ModelConfig, seed: int = 0, bias_scale: float = 0.3) -> transformers.DeepseekV3ForCausalLM:
    """A random fp32 HF model; router biases set to random values so they change selection."""
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM._from_config(hf_config(cfg), **EAGER)
    assert hf.config._attn_implementation == "eager" and hf.config._experts_implementation == "eager"
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=torch.Generator().manual_seed(seed + 1)) * bias_scale)
    return hf.eval()


def load_hf(directory, dtype=torch.float32) -> transformers.DeepseekV3ForCausalLM:
    return transformers.DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype, **EAGER).eval()


def hf_routers(hf):
    return [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
