"""Tiny random Hugging Face DeepseekV3ForCausalLM checkpoints: the oracle for tests/jax (docs/reference.md §9.2.2)."""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig


def hf_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32):
    """A random HF model with eager attention and eager experts, non-zero router bias, non-unit norms."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    # HF ignores the project's training coefficients; drop them to keep the config clean.
    for k in ("balance_loss_alpha", "bias_update_speed", "mtp_loss_weight"):
        d.pop(k, None)
    hcfg = DeepseekV3Config(**d, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms: around 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # [..., out, in]: unit-scale activations
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.to(dtype).eval()
