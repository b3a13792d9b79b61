"""dsv3_torch: the canonical PyTorch DeepSeek-V3 (see docs/API.md)."""

from dsv3.types import LossOutput, Routing
from dsv3_torch.block import Block
from dsv3_torch.generate import generate
from dsv3_torch.mla import MLA
from dsv3_torch.model import DeepSeekV3, KVCache
from dsv3_torch.moe import MLP, Experts, LocalDispatcher, MoE, MoEOutput, Router, sequence_balance_loss
from dsv3_torch.mtp import MTPModule
from dsv3_torch.norm import RMSNorm
from dsv3_torch.rope import RotaryEmbedding, apply_rope, rope_inv_freq

__all__ = ["DeepSeekV3", "KVCache", "LossOutput", "Routing", "generate", "MLA", "MLP", "Experts", "LocalDispatcher",
           "MoE", "MoEOutput", "Router", "sequence_balance_loss", "Block", "MTPModule", "RMSNorm", "RotaryEmbedding",
           "apply_rope", "rope_inv_freq"]
