"""PyTorch's adapter for the bench's row drivers (``rows.py``): the training
backend's step, eager and torch.compile; ``dsv3_torch.DeepSeekV3`` for
prefill, decoding and its first MoE layer."""

from __future__ import annotations

from functools import partial

import numpy as np

from dsv3.bench.common import backend_train_step
from dsv3.bench.rows import Adapter, Row, operand_shapes
from dsv3.bench.timing import torch_sync


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


class TorchAdapter(Adapter):
    framework = "torch"

    def __init__(self, ctx, dtype=None):
        super().__init__(ctx, dtype)
        self.sync, self.dtype = torch_sync(ctx.device), torch_dtype(self.dtype_name)

    def inference(self):
        import torch

        return torch.inference_mode()

    def tensor(self, a: np.ndarray, requires_grad: bool = False):
        """A float array in the bench's dtype on its device."""
        import torch

        return torch.as_tensor(np.ascontiguousarray(a)).to(self.ctx.device, self.dtype).requires_grad_(requires_grad)

    def tokens(self, a: np.ndarray):
        import torch

        return torch.as_tensor(np.asarray(a), dtype=torch.long, device=self.ctx.device)

    # ------------------------------------------------- the model-facing calls
    def build(self, mtp: bool = False):
        """dsv3_torch.DeepSeekV3 on the bench's weights, dtype and device."""
        import dsv3_torch

        model = dsv3_torch.DeepSeekV3(self.ctx.config(mtp), dtype=self.dtype)
        model.load_canonical_state(self.ctx.weights(mtp))
        return model.to(self.ctx.device)

    def decoder(self):
        model = self.build().eval()
        return model.init_cache, model.forward_cached

    def generators(self):
        import dsv3_torch
        from dsv3_torch.speculative import speculative_generate

        model = self.build(mtp=True).eval()
        return (lambda ps, n, **kw: dsv3_torch.generate(model, ps, n, **kw),
                lambda ps, n, **kw: speculative_generate(model, ps, n, **kw))

    def long_generator(self):
        import dsv3_torch

        model = self.build(mtp=False).eval()
        return lambda prompt, n: dsv3_torch.generate(model, [prompt], n)[0]

    def first_moe(self, model):
        return model.layers[self.ctx.cfg.first_k_dense_replace].ffn

    # ------------------------------------------------------------------ rows
    def train_rows(self):
        ctx = self.ctx
        variants = ["eager"] if "compile" in ctx.args.skip else ["eager", "compile"]
        for variant in variants:
            for mtp in ctx.mtp_settings():
                if variant == "compile" and ctx.args.quick and not mtp and ctx.has_mtp:
                    continue  # --quick: compile once (MTP on)
                yield Row(f"torch {variant}" + (" +MTP" if mtp else ""),
                          partial(backend_train_step, ctx, "torch", mtp, variant == "compile"),
                          {"variant": variant, "mtp": mtp})
        for variant in variants:
            yield from self.extra_dtype_train_rows(f"torch {variant}", variant, compile_=variant == "compile")

    def prefill_rows(self):
        def make():
            model, x = self.build().eval(), self.tokens(self.ctx.inputs)
            return lambda: model(x)

        yield Row("torch eager", make, {"variant": "eager"})

    def next_token(self, logits):
        return logits[:, -1:].argmax(-1)

    def moe_and_dense(self, x, dense_w, dy):
        import torch.nn.functional as F

        from dsv3_torch.cpu_matmul import linear

        moe = self.first_moe(self.build().train())
        w1, w2, w3 = (self.tensor(w.T, requires_grad=True) for w in dense_w)  # nn.Linear layout [out, in]

        def dense(xx):
            return linear(F.silu(linear(xx, w1)) * linear(xx, w3), w2)  # the model's MLP products

        x, dy = self.tensor(x), self.tensor(dy).float()
        return {"moe": self._fwd_bwd(lambda xx: moe(xx)[0], x, list(moe.parameters()), dy),
                "dense": self._fwd_bwd(dense, x, [w1, w2, w3], dy)}

    def _fwd_bwd(self, fn, x, params, dy):
        xg = x.detach().clone().requires_grad_(True)

        def fwd_bwd():
            for p in params:
                p.grad = None
            xg.grad = None
            y = fn(xg)
            (y.float() * dy).sum().backward()
            return y

        return (lambda: fn(x)), fwd_bwd, {}

    # ------------------------------------------------------------------ peak
    def matmul(self, b, M, K, N, layout):
        import torch

        if not hasattr(self, "_gen"):
            self._gen = torch.Generator(device="cpu").manual_seed(0)
        a, w = (torch.randn(*s, generator=self._gen).to(self.ctx.device, self.dtype)
                for s in operand_shapes(b, M, K, N, layout))
        x, y = (a.mT if layout == "tn" else a), (w.mT if layout == "nt" else w)
        c = torch.empty(*x.shape[:-1], N, device=self.ctx.device, dtype=self.dtype)
        from dsv3_torch import cpu_matmul

        mm = torch.bmm if b > 1 else cpu_matmul.mm  # the model's own 2-D products (MKL or oneDNN)
        call = lambda: mm(x, y, out=c)  # noqa: E731
        call.operands = (a, w)
        return call

    def peak_info(self):
        import torch

        from dsv3_torch import cpu_matmul

        info = {"device": self.ctx.device, "threads": torch.get_num_threads()}
        if self.ctx.device == "cpu" and self.dtype == torch.float32:
            info["cpu_matmul"] = cpu_matmul.backend()
        return info
