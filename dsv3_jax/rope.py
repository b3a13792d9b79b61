"""Rotary position embedding with YaRN frequencies (Paper §2.1.1; docs/reference.md §3), Flax NNX port.

The project uses the Hugging Face form of interleaved RoPE: the checkpoint's
rope rows hold interleaved pairs (x[2j], x[2j+1]); the output is de-interleaved
``concat(a cos - b sin, b cos + a sin)`` with a = x[..., 0::2], b = x[..., 1::2].
cos/sin are computed in fp32, scaled by the YaRN attention factor and cast to the
model dtype BEFORE use, so every op rounds in the model dtype, as in HF.

Shape legend: B batch, T time, H heads, R rope dim (qk_rope_head_dim), R/2 pairs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3.config import ModelConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [R/2] in fp32, YaRN-blended when cfg.rope_scaling_type == "yarn".

    Follows Hugging Face's op order exactly (docs/reference.md §3): pos_freqs = base ** (arange/d),
    extra = 1 / pos_freqs, inter = 1 / (s * pos_freqs), inv = inter * (1 - ef) + extra * ef.
    """
    d = cfg.qk_rope_head_dim
    exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    # base ** e in double, rounded once to fp32: the correctly rounded fp32 power, which is what torch's fp32
    # pow returns for these exponents (AVX2 and AVX-512 kernels alike). numpy's own fp32 power is not: on
    # AVX-512 machines it dispatches to a SIMD routine 1 ulp off at 4 of v3's 32 exponents.
    pos_freqs = np.array([math.pow(cfg.rope_theta, float(e)) for e in exponents]).astype(np.float32)
    if cfg.rope_scaling_type != "yarn":
        return (np.float32(1.0) / pos_freqs).astype(np.float32)
    s = np.float32(cfg.rope_factor)
    L0 = cfg.original_max_position_embeddings
    low = math.floor(_correction_dim(cfg.beta_fast, d, cfg.rope_theta, L0))
    high = math.ceil(_correction_dim(cfg.beta_slow, d, cfg.rope_theta, L0))
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF: prevent a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low),
                   0, 1).astype(np.float32)
    extra = np.float32(1.0) / pos_freqs
    inter = np.float32(1.0) / (s * pos_freqs)
    ef = np.float32(1.0) - ramp
    return (inter * (np.float32(1.0) - ef) + extra * ef).astype(np.float32)


class RotaryEmbedding(nnx.Module):
    """cos/sin tables [..., R/2] for absolute positions (no parameters, no state).

    The fp32 inverse frequencies are a static numpy constant computed from the config.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.attention_factor = float(cfg.rope_attention_factor)

    def __call__(self, positions: jax.Array | np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
        """cos, sin [..., R/2] of ``positions``. Static (numpy) positions are computed at once, by the same
        XLA ops, even under a trace: the tables then enter the compiled program as constants. Traced, XLA
        fused the cos and sin into every kernel that reads them (the RoPE of q and k and their gradients)
        and computed them again for every element: 20 of each in a peer-small training step, ~6 ms of its
        kernel time (docs/bench/README.md, "Measured choices in the code")."""
        if isinstance(positions, np.ndarray):
            with jax.ensure_compile_time_eval():
                return self._tables(jnp.asarray(positions), dtype)
        return self._tables(positions, dtype)

    def _tables(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        theta = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(self.cfg))  # fp32 angles
        f = jnp.float32(self.attention_factor)
        return (jnp.cos(theta) * f).astype(dtype), (jnp.sin(theta) * f).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [..., R]; output de-interleaved (HF form).

    cos/sin [..., R/2] must broadcast against x[..., 0::2]: out[j] = y[2j], out[R/2 + j] = y[2j + 1].
    """
    a, b = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
