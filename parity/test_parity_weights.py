"""Weight porting through the canonical flat dict, both ways, and checkpoints across frameworks
(dsv3_jax <-> dsv3_torch <-> transformers) with matching logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv3_jax
import dsv3_torch
from dsv3.checkpoint import CheckpointError
from dsv3.names import canonical_shapes
from dsv3.config import ModelConfig
from parity_util import abstract_jax, assert_close, bits, born_state, make_pair, record

TINY = ModelConfig.preset("tiny")
NO_LORA = TINY.replace(q_lora_rank=None, rope_scaling_type=None, n_shared_experts=0, num_nextn_predict_layers=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", [TINY, NO_LORA], ids=["tiny", "no-lora-no-shared-mtp2"])
def test_round_trips_bit_exact(cfg, dtype):
    """torch -> jax -> torch and jax -> torch -> jax reproduce every tensor bit for bit."""
    for born in ("torch", "jax"):
        tm, jm = make_pair(cfg, dtype, born, seed=1)
        first, other = (tm, jm) if born == "torch" else (jm, tm)
        a = first.canonical_state()
        assert set(a) == set(canonical_shapes(cfg))
        b = other.canonical_state()
        back = (dsv3_torch.DeepSeekV3(cfg, dtype=tm.dtype, device="meta") if born == "torch"
                else abstract_jax(cfg, dtype))
        back.load_canonical_state(b)
        c = back.canonical_state()
        for k in a:
            assert a[k].dtype == b[k].dtype == c[k].dtype, k
            np.testing.assert_array_equal(bits(b[k]), bits(a[k]), err_msg=f"{born}->other {k}")
            np.testing.assert_array_equal(bits(c[k]), bits(a[k]), err_msg=f"{born} round trip {k}")
        record(f"weights round trip ({born} born)", dtype, 0.0, 0.0, "bits")


@pytest.mark.parametrize("target", ["torch", "jax"])
def test_bad_state_is_named(target):
    state = born_state(TINY, "torch")
    bad = dict(state)
    del bad["layers.1.ffn.experts.w2"]
    bad["layers.1.ffn.experts.w4"] = bad["layers.1.ffn.experts.w1"]
    bad["layers.0.attn.wkv_b.weight"] = bad["layers.0.attn.wkv_b.weight"].T
    model = dsv3_torch.DeepSeekV3(TINY) if target == "torch" else dsv3_jax.DeepSeekV3(TINY)
    with pytest.raises(CheckpointError) as e:
        model.load_canonical_state(bad)
    msg = str(e.value)
    for key in ("missing", "layers.1.ffn.experts.w2", "unexpected", "layers.1.ffn.experts.w4",
                "shape mismatch", "layers.0.attn.wkv_b.weight"):
        assert key in msg, (key, msg)


def _logits_pair(tm, jm, ids):
    with torch.no_grad():
        lt = tm(torch.as_tensor(ids))
    return lt, jm(jnp.asarray(ids, jnp.int32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoints_cross_load(tmp_path, dtype):
    """save_pretrained in one framework, from_pretrained in the other (and in transformers)."""
    from transformers import DeepseekV3ForCausalLM

    tm, jm = make_pair(TINY, dtype, "jax", seed=2)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 10))
    lt, lj = _logits_pair(tm, jm, ids)
    jm.save_pretrained(tmp_path / "from_jax")
    tm.save_pretrained(tmp_path / "from_torch")
    t2 = dsv3_torch.DeepSeekV3.from_pretrained(tmp_path / "from_jax", dtype=tm.dtype)
    j2 = dsv3_jax.DeepSeekV3.from_pretrained(tmp_path / "from_torch", dtype=jm.dtype)
    for k, v in jm.canonical_state().items():  # the files carry the exact tensors
        np.testing.assert_array_equal(bits(t2.canonical_state()[k]), bits(v), err_msg=k)
        np.testing.assert_array_equal(bits(j2.canonical_state()[k]), bits(v), err_msg=k)
    lt2, lj2 = _logits_pair(t2, j2, ids)
    np.testing.assert_array_equal(lt2.float().numpy(), lt.float().numpy())
    np.testing.assert_array_equal(np.asarray(lj2, np.float32), np.asarray(lj, np.float32))
    assert_close("checkpoint jax->torch logits", dtype, lj2, lt2)
    # transformers reads the dsv3_jax checkpoint (MTP layer ignored) and agrees with the main head
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "from_jax", dtype=tm.dtype, attn_implementation="eager",
                                               experts_implementation="eager").eval()
    with torch.no_grad():
        lh = hf(torch.as_tensor(ids)).logits
    assert_close("checkpoint jax->transformers logits", dtype, lj, lh)
