"""CPU cost of the grouped expert matmul (REFERENCE §11): block-sparse vs ragged_dot vs the ideal
single matmul over the routed rows. Marked slow; prints the ratios (pytest -s) and asserts the one
relation that holds on any CPU: block-sparse is several times cheaper than ragged_dot there."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.moe import _blocksparse_swiglu, _ragged_swiglu, default_block_rows, silu


def best_of(f, *args, n=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def moe_timings(M=8192, E=16, D=256, F=128, seed=0):
    """Seconds (best of 5) for SwiGLU over M expert-sorted rows: ideal (one expert, no routing),
    block-sparse, ragged_dot; forward only and forward+backward."""
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((E, D, F)) * 0.05, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((E, F, D)) * 0.05, jnp.float32)
    sizes = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)
    bm = default_block_rows(M, E)
    fns = {
        "ideal": lambda x, s, a, b, c: (silu(x @ a[0]) * (x @ c[0])) @ b[0],
        "blocksparse": lambda x, s, a, b, c: (lambda yb, pos: yb[pos])(*_blocksparse_swiglu(x, s, a, b, c, bm)),
        "ragged_dot": _ragged_swiglu,
    }
    out = {}
    for name, f in fns.items():
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda x, s, a, b, c, f=f: jnp.sum(f(x, s, a, b, c) ** 2), argnums=(0, 2, 3, 4)))
        out[name] = (best_of(fwd, xs, sizes, w1, w2, w3), best_of(bwd, xs, sizes, w1, w2, w3, n=3))
    return out, bm


@pytest.mark.slow
def test_blocksparse_is_near_ideal_and_beats_ragged_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU cost model")
    t, bm = moe_timings(M=4096)
    ideal_f, ideal_b = t["ideal"]
    for name, (f, b) in t.items():
        print(f"{name:12s} fwd {f * 1e3:8.1f} ms ({f / ideal_f:5.2f}x ideal)   fwd+bwd {b * 1e3:8.1f} ms "
              f"({b / ideal_b:5.2f}x ideal)   bm={bm}")
    assert t["blocksparse"][0] * 3 < t["ragged_dot"][0]
    assert t["blocksparse"][1] * 3 < t["ragged_dot"][1]
