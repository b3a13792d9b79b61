"""dsv3_jax: DeepSeek-V3 in Flax NNX, the port of dsv3_torch (same files, classes, attribute names).

    import dsv3_jax
    model = dsv3_jax.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                       # int32 [B, T] -> [B, T, V]
"""

from dsv3 import runtime as _runtime
from dsv3.types import LossOutput, Routing
from dsv3_jax.block import Block
from dsv3_jax.generate import generate
from dsv3_jax.mla import MLA
from dsv3_jax.model import DeepSeekV3, KVCache
from dsv3_jax.moe import MLP, Experts, LocalDispatcher, MoE, MoEOutput, Router, RouterBias, sequence_balance_loss
from dsv3_jax.mtp import MTPModule
from dsv3_jax.norm import RMSNorm
from dsv3_jax.rope import RotaryEmbedding, apply_rope, rope_inv_freq

_runtime.configure_jax_dispatch()  # where the dsv3 command's process settings are applied (dsv3/runtime.py)

__all__ = ["DeepSeekV3", "KVCache", "LossOutput", "Routing", "generate", "MLA", "MLP", "Experts", "LocalDispatcher",
           "MoE", "MoEOutput", "Router", "RouterBias", "sequence_balance_loss", "Block", "MTPModule", "RMSNorm",
           "RotaryEmbedding", "apply_rope", "rope_inv_freq"]
