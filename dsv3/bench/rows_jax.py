"""JAX's adapter for the bench's row drivers (``rows.py``): the training
backend's jitted step; ``dsv3_jax.DeepSeekV3`` for prefill, decoding and its
first MoE layer.

Every jitted function uses the split/merge pattern (``nnx.split`` outside,
``nnx.merge`` inside ``jax.jit``), so a call pays no NNX graph traversal in
Python; the decoding step donates its cache.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from dsv3.bench.common import backend_train_step
from dsv3.bench.rows import Adapter, Row, operand_shapes
from dsv3.bench.timing import jax_sync


def loop_products(macs: int) -> int:
    """How many times ``JaxAdapter.matmul`` repeats a product of ``macs`` multiply-adds in one call:
    about 2·10⁸ of them (a few ms), 4 to 64 times."""
    return int(min(64, max(4, -(-200_000_000 // max(macs, 1)))))


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name]


def jax_device(device: str):
    import jax

    return jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]


class JaxAdapter(Adapter):
    framework = "jax"
    kernels = "in_out"  # Flax

    def __init__(self, ctx, dtype=None):
        super().__init__(ctx, dtype)
        self.dtype, self.device = jax_dtype(self.dtype_name), jax_device(ctx.device)

    def sync(self, out) -> None:
        jax_sync(out)

    def scope(self):
        import jax

        return jax.default_device(self.device)

    def array(self, a: np.ndarray):
        import jax

        return jax.device_put(np.asarray(a, np.float32).astype(self.dtype), self.device)

    def tokens(self, a: np.ndarray):
        import jax.numpy as jnp

        return jnp.asarray(a, dtype=jnp.int32)

    # ------------------------------------------------- the model-facing calls
    def build(self, mtp: bool = False):
        """dsv3_jax.DeepSeekV3 on the bench's weights and dtype."""
        import dsv3_jax
        from flax import nnx

        model = dsv3_jax.DeepSeekV3(self.ctx.config(mtp), rngs=nnx.Rngs(0), dtype=self.dtype)
        model.load_canonical_state(self.ctx.weights(mtp))
        return model

    def generators(self):
        import dsv3_jax
        from dsv3_jax.speculative import speculative_generate

        model = self.build(mtp=True)
        return (lambda ps, n, **kw: dsv3_jax.generate(model, ps, n, **kw),
                lambda ps, n, **kw: speculative_generate(model, ps, n, **kw))

    def long_generator(self):
        import dsv3_jax

        model = self.build(mtp=False)
        return lambda prompt, n: dsv3_jax.generate(model, [prompt], n)[0]

    def decoder(self):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        model = self.build()
        graphdef, state = nnx.split(model)

        @partial(jax.jit, donate_argnums=2)
        def fwd_cached(st, tok, cache, pos):
            return nnx.merge(graphdef, st).forward_cached(tok, cache, pos)

        return model.init_cache, lambda tok, cache, pos: fwd_cached(state, tok, cache, jnp.int32(pos))

    def first_moe(self, model):
        return model.layers[self.ctx.cfg.first_k_dense_replace].ffn

    # ------------------------------------------------------------------ rows
    def train_rows(self):
        for mtp in self.ctx.mtp_settings():
            yield Row("jax jit" + (" +MTP" if mtp else ""), partial(backend_train_step, self.ctx, "jax", mtp),
                      {"variant": "jit", "mtp": mtp})
        yield from self.extra_dtype_train_rows("jax jit", "jit")

    def prefill_rows(self):
        def make():
            import jax
            from flax import nnx

            graphdef, state = nnx.split(self.build())
            fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
            x = self.tokens(self.ctx.inputs)
            return lambda: fwd(state, x)

        yield Row("jax jit", make, {"variant": "jit"})

    def next_token(self, logits):
        import jax.numpy as jnp

        return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)

    def moe_and_dense(self, x, dense_w, dy):
        import jax
        from flax import nnx

        graphdef, params, rest = nnx.split(self.first_moe(self.build()), nnx.Param, ...)

        def moe_apply(p, xx):
            return nnx.merge(graphdef, p, rest)(xx)[0]

        def dense_apply(w, xx):  # on the rows flattened to 2-D, as dsv3_jax's own MLP (dsv3_jax.layers.dense)
            x2 = xx.reshape(-1, xx.shape[-1])
            return ((jax.nn.silu(x2 @ w[0]) * (x2 @ w[2])) @ w[1]).reshape(xx.shape)

        x, dy = self.array(x), self.array(dy)
        dense_w = tuple(self.array(w) for w in dense_w)
        return {"moe": self._fwd_bwd(moe_apply, params, x, dy, {"source": "model.layers[first MoE].ffn"}),
                "dense": self._fwd_bwd(dense_apply, dense_w, x, dy, {"source": "bench SwiGLU"})}

    @staticmethod
    def _fwd_bwd(apply, w, x, dy, extra):
        import jax
        import jax.numpy as jnp

        fwd = jax.jit(apply)
        loss = lambda w_, x_, dy_: (apply(w_, x_).astype(jnp.float32) * dy_).sum()  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return (lambda: fwd(w, x)), (lambda: grad(w, x, dy)), extra

    # ------------------------------------------------------------------ peak
    def matmul(self, b, M, K, N, layout):
        """``products`` repeats of the product in one jitted loop (a call returns the last): XLA:CPU runs
        a small product called alone up to twice as slow as the same product inside a compiled step
        (512×256×128, nn and nt: 78–105 GFLOP/s alone, 134–168 in a loop of 16; docs/bench/README.md),
        so timing it alone would overstate the step's matmul time. Each repeat depends on the one before
        (its result is added, times a zero the compiler cannot see, to one operand element), so none is
        hoisted."""
        import jax
        import jax.numpy as jnp

        if not hasattr(self, "_mm"):
            self._rng = np.random.default_rng(0)
            self._mm = {}
        n = loop_products(b * M * K * N)
        key = (layout, n)
        if key not in self._mm:
            # fp32 on GPU/TPU: the default precision may use reduced-precision passes.
            hi = jax.lax.Precision.HIGHEST
            t = partial(jnp.swapaxes, axis1=-1, axis2=-2)
            f = {"nn": lambda x, y: jnp.matmul(x, y, precision=hi),
                 "nt": lambda x, w: jnp.matmul(x, t(w), precision=hi),
                 "tn": lambda x, y: jnp.matmul(t(x), y, precision=hi)}[layout]

            def repeated(a, w, zero):
                corner = (0,) * a.ndim

                def body(_, carry):
                    a_, _c = carry
                    c = f(a_, w)
                    return a_.at[corner].add(c[(0,) * c.ndim] * zero), c

                c0 = jnp.zeros(jax.eval_shape(f, a, w).shape, a.dtype)
                return jax.lax.fori_loop(0, n, body, (a, c0))[1]

            self._mm[key] = jax.jit(repeated)
        a, w = (self.array(self._rng.standard_normal(s, dtype=np.float32))
                for s in operand_shapes(b, M, K, N, layout))
        mm, zero = self._mm[key], self.array(np.zeros((), np.float32))
        call = lambda: mm(a, w, zero)  # noqa: E731
        call.operands, call.products = (a, w), n
        return call

    def peak_info(self):
        return {"device": str(self.device)}
