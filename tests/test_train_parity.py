"""Training parity: the same tiny model (weights ported torch -> JAX through canonical_state), the same
batches and the same schedule, trained 50 steps in PyTorch and in JAX (fp32): the loss curves agree at
every step and the router biases agree after training."""

import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3.data import BatchSampler, load_corpus
from dsv3.train_config import TrainConfig, lr_at

pytest.importorskip("dsv3_jax.train")

TINY = ModelConfig.preset("tiny").replace(vocab_size=256)
STEPS = 50


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(backend, sampler, tcfg):
    curve = []
    for step in range(STEPS):
        out = backend.train_step([sampler.batch(step * tcfg.batch_size, tcfg.batch_size)], lr_at(step, tcfg))
        curve.append([out[k] for k in ("loss", "main_loss", "mtp_depth_loss", "balance_loss", "grad_norm")])
    return np.array(curve, np.float64)


def test_torch_and_jax_train_the_same(capsys):
    from dsv3_jax.train import JaxBackend
    from dsv3_torch.train import TorchBackend

    # eps=1e-3 as in test_train_backends.py, so the compiled JAX step is shared (the default eps=1e-8 gives the
    # same agreement here: max relative loss difference 3.2e-7 over the 50 steps, measured once).
    tcfg = TrainConfig(steps=STEPS, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, eps=1e-3, progress=False)
    tb = TorchBackend(TINY, tcfg)
    jb = JaxBackend(TINY, tcfg)
    jb.load_canonical_state(tb.canonical_state())
    sampler = BatchSampler(load_corpus(max_bytes=300_000).train, tcfg.seq_len, seed=0)
    ct, cj = _run(tb, sampler, tcfg), _run(jb, sampler, tcfg)
    rel = np.abs(cj - ct) / np.abs(ct)
    with capsys.disabled():
        print(f"\ntrain parity over {STEPS} steps: loss {ct[0, 0]:.4f} -> {ct[-1, 0]:.4f}; max relative difference "
              f"total {rel[:, 0].max():.2e}, main {rel[:, 1].max():.2e}, MTP {rel[:, 2].max():.2e}, "
              f"balance {rel[:, 3].max():.2e}, grad norm {rel[:, 4].max():.2e}")
    assert ct[-1, 1] < ct[0, 1] - 1.0  # it trained
    np.testing.assert_allclose(cj[:, :3], ct[:, :3], rtol=1e-4)  # every step's losses
    np.testing.assert_allclose(cj[:, 4], ct[:, 4], rtol=1e-3)  # gradient norms
    st, sj = tb.canonical_state(), jb.canonical_state()
    biases = [k for k in st if k.endswith("gate.bias")]
    assert len(biases) == TINY.n_router_layers
    for k in biases:
        assert np.abs(st[k]).max() > 0  # the bias moved
        np.testing.assert_allclose(sj[k], st[k], rtol=0, atol=1e-6, err_msg=k)
    worst = max(float(np.abs(sj[k] - st[k]).max() / (np.abs(st[k]).max() + 1e-12)) for k in st)
    assert worst < 1e-3, worst  # every weight after 50 AdamW steps
