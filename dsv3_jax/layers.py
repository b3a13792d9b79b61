"""Layer helpers shared by the modules: bias-free Linear construction and init, the 2-D ``dense``
matmul, the last-axis softmax and log-softmax, numpy conversion. Flax kernels are [in, out]
(transposed torch weights).

Shape legend: D_in, D_out the layer's input and output widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3.config import ModelConfig


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
        flat = np.concatenate([_normal_prefix(k, min(_CHUNK, n - i * _CHUNK)) for i, k in enumerate(keys)])
        return jnp.asarray((flat.reshape(shape) * np.float32(std)).astype(np.float32), dtype=dtype)

    return init


_CHUNK = 1 << 16


def _normal_prefix(key, m: int) -> np.ndarray:
    """The first m <= _CHUNK values of ``jax.random.normal(key, (_CHUNK,))``, drawn as the first m of the
    smallest of four sizes that holds them: with jax's partitionable threefry (on by default) a draw of n
    values is the first n of any longer draw from the same key, so the values do not depend on the size
    drawn, and a small parameter does not pay for a 65536-value draw (four compiled programs in all).
    Measured: the 2-layer tiny model builds in 0.09-0.14 s instead of 0.3-0.4 s, with the same values."""
    sizes = (1 << 10, 1 << 12, 1 << 14, _CHUNK) if jax.config.jax_threefry_partitionable else (_CHUNK,)
    size = next(s for s in sizes if s >= m)
    return np.asarray(_normal_draw(key, size))[:m]


_normal_draw = jax.jit(lambda key, size: jax.random.normal(key, (size,), jnp.float32), static_argnums=1)


def const(shape, value: float, dtype) -> jax.Array:
    """A constant array placed from the host (no per-shape compile in eager mode)."""
    return jnp.asarray(np.full(shape, value, np.float32), dtype=dtype)


def linear(d_in: int, d_out: int, cfg: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """Bias-free Linear, weights N(0, initializer_range) as in HF; kernel [d_in, d_out]."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=dtype,
                      kernel_init=normal_init(cfg.initializer_range), rngs=rngs)


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """layer(x) for x [..., d_in] as ONE 2-D matmul on [prod(...), d_in]: XLA:CPU runs the backward of a
    matmul on a 3-D [B, T, D] activation slower than on the same rows flattened (docs/bench/README.md)."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def row_max(x: jax.Array) -> jax.Array:
    """``jnp.max(x, -1, keepdims=True)``, the same values (a maximum is exact in any order and NaN
    propagates the same), taken as elementwise maxima of the row's halves down to 32 entries first.
    XLA:CPU splits a max over a long minor axis into a reduce-window of 32 that ran at a third of a
    fused elementwise kernel's speed (docs/bench/README.md, "Measured choices in the code")."""
    n = x.shape[-1]
    while n > 32 and n % 2 == 0:
        n //= 2
        x = jnp.maximum(x[..., :n], x[..., n:])
    return jnp.max(x, axis=-1, keepdims=True)


def softmax(x: jax.Array) -> jax.Array:
    """``jax.nn.softmax(x, axis=-1)`` (its default, differentiated through) with the row max of
    `row_max`: the same forward and gradient bit for bit."""
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(row_max(x)))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


def log_softmax(x: jax.Array) -> jax.Array:
    """``jax.nn.log_softmax(x, axis=-1)`` with the row max of `row_max`: the same bit for bit."""
    shifted = x - jax.lax.stop_gradient(row_max(x))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def to_numpy(x: jax.Array) -> np.ndarray:
    """A host copy as numpy; bf16 is ml_dtypes.bfloat16 (same bits)."""
    return np.array(x)


def from_numpy(a: np.ndarray) -> jax.Array:
    """A device copy of a numpy array (ml_dtypes.bfloat16 becomes bf16)."""
    return jnp.asarray(np.asarray(a))
