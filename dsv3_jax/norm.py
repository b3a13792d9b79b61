"""RMSNorm (DeepSeek-V3 Paper §2; docs/reference.md §5), Flax NNX.

Numerics pinned as in Hugging Face and dsv3_torch: normalise in fp32, cast back
to the input dtype, THEN multiply by the weight in the model dtype.

Shape legend: B batch, T time, D normalised width (any trailing dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.layers import const


class RMSNorm(nnx.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.eps = float(eps)
        self.weight = nnx.Param(const((dim,), 1.0, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # cast first, then multiply by the weight in the model dtype (HF convention)
        return self.weight[...] * y.astype(x.dtype)
