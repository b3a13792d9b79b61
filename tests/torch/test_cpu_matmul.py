"""dsv3_torch.cpu_matmul: the fp32 CPU matmul library chosen per CPU, oneDNN's products and gradients
against torch's own and float64, and what stays on torch's path."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3_torch import cpu_matmul

pytestmark = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="this torch build has no oneDNN")


def _cpuinfo(tmp_path, vendor, family, flags):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\n"
                 f"flags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nvendor_id\t: other\n")
    return str(p)


@pytest.mark.parametrize("vendor,family,flags,want", [
    ("AuthenticAMD", 26, "avx2 avx512f avx512bw", "onednn"),  # Zen 5: full-width AVX-512, MKL runs AVX2
    ("AuthenticAMD", 25, "avx2 avx512f avx512bw", "mkl"),  # Zen 4: AVX-512 as two 256-bit halves
    ("AuthenticAMD", 26, "avx2 fma", "mkl"),  # no AVX-512
    ("GenuineIntel", 6, "avx2 avx512f avx512bw", "mkl"),  # MKL runs AVX-512 on Intel
])
def test_auto_backend_by_cpu(tmp_path, vendor, family, flags, want):
    assert cpu_matmul.auto_backend(_cpuinfo(tmp_path, vendor, family, flags)) == want


def test_auto_backend_without_cpuinfo_is_torchs_own(tmp_path):
    assert cpu_matmul.auto_backend(str(tmp_path / "missing")) == "mkl"


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match=cpu_matmul.ENV):
        cpu_matmul.resolve("blas")
    assert cpu_matmul.resolve(" MKL ") == "mkl"


class _Ops(TorchDispatchMode):
    """The ATen / oneDNN ops dispatched while active."""

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket)
        return func(*args, **(kwargs or {}))


ONEDNN = torch.ops.mkldnn._linear_pointwise


@pytest.mark.parametrize("shape", [(37, 96), (3, 29, 96)], ids=["2d", "3d"])
def test_onednn_linear_equals_float64_and_torchs_own_with_gradients(shape):
    """y = x·Wᵀ, dx and dW by oneDNN: within fp32 rounding of float64's (and of torch's own), the same
    gradients autograd gives F.linear."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(64, shape[-1], generator=g, requires_grad=True)
    dy = torch.randn(*shape[:-1], 64, generator=g)
    got = {}
    for name in ("onednn", "mkl"):
        x.grad = w.grad = None
        with cpu_matmul.use(name), _Ops() as ops:
            y = cpu_matmul.linear(x, w)
            (y * dy).sum().backward()
        assert (ONEDNN in ops.ops) == (name == "onednn")
        got[name] = [y.detach(), x.grad, w.grad]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.linear(x64, w64)
    (y64 * dy.double()).sum().backward()
    for a, b, ref in zip(got["onednn"], got["mkl"], [y64.detach(), x64.grad, w64.grad]):
        assert a.shape == ref.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_onednn_linear_gives_only_the_gradients_asked_for():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    for need_x in (True, False):
        xx, ww = x.clone().requires_grad_(need_x), w.clone().requires_grad_(not need_x)
        with cpu_matmul.use("onednn"):
            cpu_matmul.linear(xx, ww).sum().backward()
        assert (xx.grad is not None, ww.grad is not None) == (need_x, not need_x)
        want = torch.ones(8, 4) @ w if need_x else torch.ones(8, 4).T @ x
        torch.testing.assert_close(xx.grad if need_x else ww.grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_onednn_mm_in_each_layout_and_into_out(layout):
    g = torch.Generator().manual_seed(1)
    M, K, N = 33, 48, 20
    a = torch.randn(K, M, generator=g).T if layout == "tn" else torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g).T if layout == "nt" else torch.randn(K, N, generator=g)
    want = (a.double() @ b.double())
    out = torch.full((M + 2, N), 7.0)
    with cpu_matmul.use("onednn"), _Ops() as ops:
        y = cpu_matmul.mm(a, b)
        z = cpu_matmul.mm(a, b, out=out[1:-1])
    assert ONEDNN in ops.ops
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1:-1], y) and (out[0] == 7).all() and (out[-1] == 7).all()
    assert z.data_ptr() == out[1:-1].data_ptr()


def test_what_stays_on_torchs_own_path():
    """bf16, autocast, a recorded gradient through mm, and an empty product go to F.linear / torch.mm."""
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with cpu_matmul.use("onednn"):
        for run in (lambda: cpu_matmul.linear(x.bfloat16(), w.bfloat16()),
                    lambda: cpu_matmul.mm(x.requires_grad_(True), w.T),
                    lambda: cpu_matmul.linear(x[:0], w)):
            with _Ops() as ops:
                run()
            assert ONEDNN not in ops.ops
        with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as ops:
            y = cpu_matmul.linear(torch.randn(8, 16), w)
        assert ONEDNN not in ops.ops and y.dtype == torch.bfloat16
    y = cpu_matmul.mm(x, w.T)
    assert y.grad_fn is not None  # torch.mm recorded it


def test_the_model_trains_the_same_under_either_backend(tiny):
    """One forward and backward of the tiny model (every feature on) under each library: the loss and
    every gradient within fp32 rounding of each other (1e-5 of the tensor's largest entry; measured 7e-7
    at worst)."""
    from dsv3_torch import DeepSeekV3

    model = DeepSeekV3(tiny)
    tokens = torch.randint(0, tiny.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    got = {}
    for name in ("mkl", "onednn"):
        model.zero_grad(set_to_none=True)
        with cpu_matmul.use(name), _Ops() as ops:
            out = model.compute_loss(tokens[:, :-1], tokens[:, 1:])
            out.loss.backward()
        assert (ONEDNN in ops.ops) == (name == "onednn")
        got[name] = [out.loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(got["mkl"]) == len(got["onednn"]) > 10
    for a, b in zip(got["mkl"], got["onednn"]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
