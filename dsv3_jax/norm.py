"""RMSNorm (DeepSeek-V3 Paper §2; REFERENCE §5), Flax NNX.

Numerics pinned as in Hugging Face and dsv3_torch: normalise in fp32, cast back
to the input dtype, THEN multiply by the weight in the model dtype.

Shape legend: B batch, T time, D normalised width (any trailing dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def normal_init(std: float):
    """N(0, std) initializer (HF init) that compiles once for every shape.

    Eager ``jax.random.normal`` compiles one program per parameter shape (seconds for a tiny model);
    here a concrete key draws fixed-size chunks with ONE compiled function and the values are cut to
    shape on the host. Under tracing (nnx.eval_shape, jit) it is plain ``jax.random.normal``.
    """

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):
            return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        n = int(np.prod(shape))
        keys = jax.random.split(key, max(1, -(-n // _CHUNK)))
        flat = np.concatenate([np.asarray(_normal_chunk(k)) for k in keys])[:n]
        return jnp.asarray((flat.reshape(shape) * np.float32(std)).astype(np.float32), dtype=dtype)

    return init


_CHUNK = 1 << 16
_normal_chunk = jax.jit(lambda key: jax.random.normal(key, (_CHUNK,), jnp.float32))


def const(shape, value: float, dtype) -> jax.Array:
    """A constant array placed from the host (no per-shape compile in eager mode)."""
    return jnp.asarray(np.full(shape, value, np.float32), dtype=dtype)


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
