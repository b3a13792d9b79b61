"""fp32 matmuls on the CPU: torch's own (MKL) or oneDNN's, whichever runs the CPU's vectors at full width.

torch's CPU build multiplies fp32 matrices with MKL, and MKL runs its AVX-512 kernels on Intel CPUs
only: on an AMD CPU with AVX-512 it runs its AVX2 kernels. oneDNN, in the same build (it already does
torch's bf16 products), runs AVX-512 kernels on any CPU that has them. Where the CPU executes 512-bit
vectors at full width (AMD Zen 5, CPU family 26) that halves every fp32 product's time: on a 2-core Zen 5
EPYC VM, MKL reached 172-214 GFLOP/s on this model's products and oneDNN 148-475 (1.9-2.3x on the
forward and input-gradient layouts; the transposed-operand weight gradients 0.86-1.74x), and the
peer-small fp32 training step ran 1.195x faster (docs/bench/README.md, "Measured choices in the code"). On Zen 4 (family 25), whose AVX-512 runs as two
256-bit halves, the two libraries' kernels have the same width; there, on Intel CPUs (where MKL runs
AVX-512) and on CPUs without AVX-512, torch's own path is kept.

``DSV3_TORCH_CPU_MATMUL`` chooses: ``auto`` (the default: oneDNN on AMD CPUs of family 26 and later with
AVX-512, else MKL), ``onednn`` or ``mkl``. The two give the same products up to fp32 rounding (the order
of each dot product's sums); a run uses one throughout, so the model's own checks (grouped experts
against autograd's loop, bit for bit) hold under either.

``linear`` and ``mm`` take oneDNN's path for fp32 CPU tensors outside autocast and outside
``torch.compile`` (the compiled graph keeps torch's matmuls), and for plain tensors only (a DTensor
shards through torch's own ops); everything else goes to ``F.linear`` / ``torch.mm`` unchanged.
oneDNN's entry point is ``torch.ops.mkldnn._linear_pointwise`` (y = x·Wᵀ, the op torch's own compiler
emits for CPU linears), wrapped in an autograd function whose backward runs its two products the same way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F

from dsv3.runtime import CPUINFO, cpu_info

ENV = "DSV3_TORCH_CPU_MATMUL"
BACKENDS = ("auto", "mkl", "onednn")
ONEDNN_FIRST_AMD_FAMILY = 26  # Zen 5: full-width 512-bit vector units

# Rows of a product whose row count changes from call to call (a routed expert's) are padded to a multiple of
# this where oneDNN computes it: oneDNN builds (JIT-compiles) a kernel per new shape, and routing gives every
# expert a new row count each step. bf16: ~1 ms a first call, 8x a 323 x 256 x 128 product; fp32 under the
# oneDNN backend: ~0.3 ms against 0.13 (docs/bench/README.md, "bf16" and "Measured choices in the code").
ROW_MULTIPLE = 32

_backend: Optional[str] = None  # resolved "mkl" | "onednn", or None until first asked


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def auto_backend(path: str = CPUINFO) -> str:
    """The default choice on this CPU: "onednn" where MKL would run AVX2 kernels on full-width AVX-512
    units (AMD, family >= 26, avx512f), else "mkl"."""
    cpu = cpu_info(path)
    try:
        family = int(cpu.get("cpu family", "0"))
    except ValueError:
        family = 0
    full_width_amd = (cpu.get("vendor_id") == "AuthenticAMD" and family >= ONEDNN_FIRST_AMD_FAMILY
                      and "avx512f" in cpu.get("flags", "").split())
    return "onednn" if full_width_amd and onednn_available() else "mkl"


def resolve(choice: Optional[str]) -> str:
    choice = (choice or "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return auto_backend()
    if choice == "onednn" and not onednn_available():
        raise RuntimeError(f"{ENV}=onednn, but this torch build has no oneDNN (torch.backends.mkldnn)")
    return choice


def backend() -> str:
    """The fp32 CPU matmul library of this process: "mkl" or "onednn" (``DSV3_TORCH_CPU_MATMUL``)."""
    global _backend
    if _backend is None:
        _backend = resolve(os.environ.get(ENV))
    return _backend


@contextlib.contextmanager
def use(choice: str):
    """Run the block with the given backend ("auto" | "mkl" | "onednn"), then restore the previous one."""
    global _backend
    previous, _backend = backend(), resolve(choice)
    try:
        yield _backend
    finally:
        _backend = previous


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _records_grad(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def _onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x·(w as a Linear weight) takes oneDNN's path."""
    if torch.compiler.is_compiling():  # first: Dynamo then traces nothing of the rest
        return False
    return (backend() == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.dim() >= 2 and x.numel() > 0 and w.numel() > 0
            and _plain(x) and _plain(w) and not torch.is_autocast_enabled("cpu"))


def row_multiple(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    """ROW_MULTIPLE where products of x's rows in ``dtype`` (default x's) go to oneDNN on the CPU (bf16 and
    fp16 always, also under torch.compile; fp32 under the oneDNN backend outside torch.compile, whose graph
    keeps torch's fp32 products), else 1. In a compiled graph the row counts are symbols and every new one
    was a new oneDNN kernel: a bf16 expert product took ~2 ms a call there (docs/bench/README.md, "bf16")."""
    if x.device.type != "cpu":
        return 1
    dtype = dtype or x.dtype
    if dtype in (torch.bfloat16, torch.float16):
        return ROW_MULTIPLE
    if torch.compiler.is_compiling():  # before backend(): its first call reads /proc/cpuinfo, a graph break
        return 1
    return ROW_MULTIPLE if dtype == torch.float32 and backend() == "onednn" else 1


def _lp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] · w [N, K]ᵀ -> [..., N] by oneDNN, no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x·Wᵀ with its gradients dx = dy·W and dW = dyᵀ·x, each one oneDNN product."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _lp(x, w)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])
        gx = _lp(g, w.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = _lp(g.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        return gx, gw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) without bias: x [..., K], w [N, K] -> [..., N]."""
    if not _onednn(x, w):
        return F.linear(x, w)
    if _records_grad(x, w):
        return _OneDNNLinear.apply(x, w)
    return _lp(x, w)


def mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.mm(a, b, out=out) for 2-D a [M, K], b [K, N]: a custom autograd function's products
    (where a gradient is recorded, torch.mm's own). oneDNN writes a new tensor; with ``out`` it is
    copied there."""
    if a.dim() != 2 or not _onednn(a, b) or _records_grad(a, b):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    y = _lp(a, b.t())
    return y if out is None else out.copy_(y)
