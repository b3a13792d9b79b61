"""Shared helpers for parity/: paired models with the same weights, error metrics, the error table.

Weights move between the frameworks ONLY through the canonical flat dict
(``canonical_state`` / ``load_canonical_state``), the same path users take.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx

import dsv3_jax
import dsv3_torch
from dsv3.config import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # max |a - b| / max(1, max |ref|)
GRAD_TOL = {"float32": 1e-4}  # max |ga - gb| / max |g| per parameter (relative to its own scale)

_RESULTS: dict = defaultdict(lambda: [0.0, 0.0, 0, ""])
_FILE = os.environ.get("DSV3_PARITY_RESULTS")  # JSON lines shared by pytest-xdist workers (conftest.py)


def set_results_file(path: str | None) -> None:
    global _FILE
    _FILE = path


def _add(results, component, dtype, err, tol, metric):
    r = results[(component, dtype)]
    r[0], r[1], r[2], r[3] = max(r[0], float(err)), tol, r[2] + 1, metric


def record(component: str, dtype: str, err: float, tol: float, metric: str = "max|d|/max(1,|ref|)") -> None:
    """Note one comparison's error for the end-of-run table (max per component and dtype)."""
    _add(_RESULTS, component, dtype, err, tol, metric)
    if _FILE:
        with open(_FILE, "a") as f:
            f.write(json.dumps([component, dtype, float(err), tol, metric]) + "\n")


def summary_rows():
    results = _RESULTS
    if _FILE and os.path.exists(_FILE):  # every process's records (xdist workers included)
        results = defaultdict(lambda: [0.0, 0.0, 0, ""])
        with open(_FILE) as f:
            for line in f:
                _add(results, *json.loads(line))
    return [(c, d, v[0], v[1], v[2], v[3]) for (c, d), v in sorted(results.items())]


# ------------------------------------------------------------------ arrays
def np32(x) -> np.ndarray:
    """torch / jax / numpy (bf16 included) -> float64 numpy for comparisons."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(jnp.asarray(x).astype(jnp.float32) if isinstance(x, jax.Array) else x, np.float64)


def rel_err(a, b) -> float:
    a, b = np32(a), np32(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) if a.size else 0.0


def assert_close(component: str, dtype: str, jax_out, torch_out, tol: float | None = None) -> float:
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(jax_out, torch_out)
    record(component, dtype, err, tol)
    assert err <= tol, f"{component} [{dtype}]: max error {err:.3e} > {tol:.1e}"
    return err


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl(p_logits, q_logits) -> float:
    """Mean KL(softmax(p) || softmax(q)) over positions (p: torch reference)."""
    lp, lq = log_softmax(np32(p_logits)), log_softmax(np32(q_logits))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


# ------------------------------------------------------------ model pairs
def rescale_state(state: dict, seed: int) -> dict:
    """Unit-scale activations from a framework's own init (std 0.02 would make every test trivially close):
    matrices times 1/(0.02 sqrt(fan_in)), norm weights 1 + 0.2 N(0,1), router biases 0.1 N(0,1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        v = np.asarray(v, np.float32)
        if k.endswith("gate.bias"):
            out[k] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        elif v.ndim == 1:
            out[k] = (1.0 + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        else:
            out[k] = (v / (0.02 * np.sqrt(v.shape[-1]))).astype(np.float32)
    return out


def born_state(cfg: ModelConfig, born: str, seed: int = 0) -> dict:
    """fp32 canonical weights created by one framework's initialiser (then rescaled), read back out of it."""
    if born == "torch":
        torch.manual_seed(seed)
        m = dsv3_torch.DeepSeekV3(cfg)
    elif born == "jax":
        m = dsv3_jax.DeepSeekV3(cfg, rngs=nnx.Rngs(seed))
    else:
        raise ValueError(born)
    m.load_canonical_state(rescale_state(m.canonical_state(), seed))
    return m.canonical_state()


_ABSTRACT: dict = {}


def abstract_jax(cfg: ModelConfig, dtype: str, **jax_kw):
    """dsv3_jax.DeepSeekV3.abstract(cfg, dtype) (ShapeDtypeStruct leaves, as from_pretrained builds it), traced
    once per config and dtype in a test process and cloned after that (the trace costs ~1 s on the tiny preset)."""
    key = (cfg, dtype, tuple(sorted(jax_kw.items())))
    if key not in _ABSTRACT:
        _ABSTRACT[key] = dsv3_jax.DeepSeekV3.abstract(cfg, JAX_DTYPES[dtype], **jax_kw)
    return nnx.clone(_ABSTRACT[key])


def make_pair(cfg: ModelConfig, dtype: str = "float32", born: str = "torch", seed: int = 0, **jax_kw):
    """(torch model, jax model) holding the same weights; the born-in framework's state is ported."""
    state = born_state(cfg, born, seed)
    tm = dsv3_torch.DeepSeekV3(cfg, dtype=TORCH_DTYPES[dtype], device="meta")  # filled by load, as from_pretrained
    jm = abstract_jax(cfg, dtype, **jax_kw)  # filled by load, as from_pretrained
    if born == "torch":
        tm.load_canonical_state(state)
        jm.load_canonical_state(tm.canonical_state())
    else:
        jm.load_canonical_state(state)
        tm.load_canonical_state(jm.canonical_state())
    tm.eval()
    return tm, jm


def bits(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype == ml_dtypes.bfloat16 else np.uint32 if a.itemsize == 4 else np.uint8)
