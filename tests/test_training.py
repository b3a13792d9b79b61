"""dsv3.train_config, rundir, plots, training: schedule, decay rule, metrics, plots, checkpoint layout, resume-state I/O and the
loop driver (driven here by a numpy backend, so these tests need neither torch nor jax)."""

import json
import math
import os

import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3.checkpoint import load_canonical, save_canonical
from dsv3.data import load_corpus
from dsv3.flops import param_counts
from dsv3.names import canonical_shapes
from dsv3.plots import plot_expert_load, plot_losses
from dsv3.rundir import (
    latest_checkpoint, load_train_state, read_metrics, resolve_weights_dir, save_train_state, write_checkpoint,
)
from dsv3.train_config import TrainConfig, decays, lr_at, model_config
from dsv3.training import NonFiniteLoss, load_ratio, train

TINY = ModelConfig.preset("tiny").replace(vocab_size=256)


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(t.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(1e-4)  # floor at the last step
    mid = 10 + (t.steps - 1 - 10) / 2
    assert lr_at(int(mid), t) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    assert lr_at(0, TrainConfig(steps=5, warmup_steps=0, lr=2.0)) == pytest.approx(2.0)


def test_decay_rule_skips_norms_and_router_bias():
    for name, nd in canonical_shapes(TINY).items():
        expect = not (name.endswith("norm.weight") or name.endswith("gate.bias"))
        assert decays(name, len(nd)) == expect, name
    assert not decays("layers/attn_norm/weight", 2)  # a stacked norm stays undecayed
    assert decays("layers/attn/wq_a/kernel", 3)


def test_train_config_validation_and_overrides():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="framework"):
        TrainConfig(framework="tf")
    cfg = model_config(TrainConfig(preset="tiny", bias_update_speed=0.0, mtp_loss_weight=0.1, seq_len=32))
    assert cfg.bias_update_speed == 0.0 and cfg.mtp_loss_weight == 0.1
    assert cfg.balance_loss_alpha == ModelConfig.preset("tiny").balance_loss_alpha
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model_config(TrainConfig(preset="tiny", seq_len=4096))
    t = TrainConfig(steps=7, lr=3e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert (TrainConfig().scan_layers, TrainConfig().remat) == (False, "none")
    with pytest.raises(ValueError, match="remat"):
        TrainConfig(remat="some")
    with pytest.raises(ValueError, match="remat"):  # activation checkpointing is a JAX option
        TrainConfig(framework="torch", remat="full")
    assert TrainConfig(framework="torch", scan_layers=True).scan_layers  # accepted, ignored by torch
    from dsv3.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--preset", "tiny", "--scan-layers", "--remat", "dots"])
    assert (train_config_from_args(args).scan_layers, train_config_from_args(args).remat) == (True, "dots")


def test_load_ratio_and_param_counts():
    c = np.array([[4, 4, 4, 4], [8, 0, 4, 4], [0, 0, 0, 0]])
    assert load_ratio(c).tolist() == [1.0, 2.0, 1.0]
    pc = param_counts(ModelConfig.preset("small"))
    assert pc.main == sum(int(np.prod(s)) for n, s in canonical_shapes(ModelConfig.preset("small")).items()
                             if not n.startswith("mtp.") and not n.endswith("gate.bias"))
    assert 6.0e6 < pc.main < 7.0e6  # config.py: 6.55M without MTP
    assert pc.active_per_token < pc.main


def test_write_checkpoint_atomic_and_keeps_last(tmp_path):
    out = str(tmp_path / "run")

    def writer(tag):
        def w(d):
            with open(os.path.join(d, "f.txt"), "w") as f:
                f.write(tag)
        return w

    write_checkpoint(out, 1, writer("one"), keep=2)
    write_checkpoint(out, 2, writer("two"), keep=2)

    def crash(d):
        with open(os.path.join(d, "f.txt"), "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, 3, crash, keep=2)
    assert latest_checkpoint(out).endswith("step_000002")
    assert sorted(os.listdir(out)) == ["latest", "step_000001", "step_000002"]  # nothing half-written
    write_checkpoint(out, 3, writer("three"), keep=2)
    assert sorted(os.listdir(out)) == ["latest", "step_000002", "step_000003"]
    with open(os.path.join(latest_checkpoint(out), "f.txt")) as f:
        assert f.read() == "three"
    write_checkpoint(out, 3, writer("again"), keep=2)  # re-save the same step
    with open(os.path.join(latest_checkpoint(out), "f.txt")) as f:
        assert f.read() == "again"


def test_train_state_round_trip_no_pickle(tmp_path):
    tensors = {"opt.mu.embed": np.arange(6, dtype=np.float32).reshape(2, 3), "opt.count": np.array(5, np.int32)}
    meta = {"step": 5, "samples_seen": 40, "seed": 1}
    save_train_state(str(tmp_path), tensors, meta)
    t2, m2 = load_train_state(str(tmp_path))
    assert m2 == meta and set(t2) == set(tensors)
    assert all(np.array_equal(t2[k], tensors[k]) and t2[k].dtype == tensors[k].dtype for k in tensors)
    with open(tmp_path / "train_state.safetensors", "rb") as f:
        assert b"pickle" not in f.read(200)
    os.makedirs(tmp_path / "x")
    save_train_state(str(tmp_path / "x"), {}, meta)
    assert load_train_state(str(tmp_path / "x"))[0] == {}


def test_plots_written(tmp_path):
    recs = []
    rng = np.random.default_rng(0)
    for s in range(1, 41):
        recs.append({"kind": "train", "step": s, "main_loss": 3 - s / 20, "mtp_depth_loss": 3.2 - s / 20,
                     "counts": rng.integers(0, 50, size=(3, 8)).tolist()})
        if s % 10 == 0:
            recs.append({"kind": "eval", "step": s, "val_loss": 3 - s / 21, "val_mtp_loss": 3.3 - s / 21})
    plot_losses(recs, str(tmp_path / "loss.png"))
    plot_expert_load(recs, str(tmp_path / "load.png"), ["a", "b", "c"])
    for p in ("loss.png", "load.png"):
        with open(tmp_path / p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------- the driver
class NumpyBackend:
    """A deterministic stand-in model: exercises the driver's bookkeeping, not the maths."""

    def __init__(self, cfg, tcfg, nan_at=None):
        self.model_cfg, self.tcfg, self.nan_at = cfg, tcfg, nan_at
        rng = np.random.default_rng(tcfg.seed)
        self.state = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in canonical_shapes(cfg).items()}
        self.m = np.zeros_like(self.state["embed.weight"])
        self.steps = 0
        self.evals = 0

    def _loss(self, x, y):
        e = self.state["embed.weight"]
        return float(np.mean((e[x] - e[y]) ** 2))

    def train_step(self, micro, lr):
        self.steps += 1
        loss = float(np.mean([self._loss(x, y) for x, y in micro]))
        if self.nan_at == self.steps:
            loss = float("nan")
        g = np.zeros_like(self.m)
        counts = np.zeros((self.model_cfg.n_router_layers, self.model_cfg.n_routed_experts), np.int64)
        for x, y in micro:
            np.add.at(g, x.ravel(), 1e-3)
            counts += np.bincount(x.ravel() % self.model_cfg.n_routed_experts, minlength=counts.shape[1])
        self.m = 0.9 * self.m + g
        self.state["embed.weight"] = self.state["embed.weight"] - lr * self.m
        return {"loss": loss, "main_loss": loss, "mtp_loss": 0.3 * loss, "mtp_depth_loss": loss,
                "balance_loss": 1e-4, "grad_norm": float(np.linalg.norm(g)), "counts": counts}

    def eval_step(self, x, y):
        self.evals += 1
        return {"main_loss": self._loss(x, y), "mtp_depth_loss": self._loss(x, y)}

    def canonical_state(self):
        return dict(self.state)

    def load_canonical_state(self, state):
        self.state = {k: np.array(v) for k, v in state.items()}

    def optimizer_state(self):
        return {"m.embed": self.m}

    def load_optimizer_state(self, t):
        self.m = np.array(t["m.embed"])

    def save_pretrained(self, d):
        save_canonical(d, self.state, self.model_cfg)


@pytest.fixture(scope="module")
def small_corpus():
    return load_corpus(max_bytes=200_000)


def _tcfg(out, **kw):
    base = dict(framework="torch", config=None, preset="tiny", out=str(out), steps=12, batch_size=4, seq_len=16,
                warmup_steps=2, eval_every=4, eval_batches=2, save_every=4, progress=False, plots=True)
    base.update(kw)
    return TrainConfig(**base)


def _make(cfg, tcfg):
    return NumpyBackend(cfg.replace(vocab_size=256), tcfg)


def test_driver_writes_metrics_plots_checkpoints(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setattr("dsv3.training.model_config", lambda t: TINY)
    res = train(_tcfg(tmp_path / "run"), _make, corpus=small_corpus, quiet=True)
    out = tmp_path / "run"
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [4, 8, 12]
    assert all(len(r["counts"]) == TINY.n_router_layers for r in recs if r["kind"] == "train")
    assert res.final_val_loss == [r for r in recs if r["kind"] == "eval"][-1]["val_loss"]
    assert latest_checkpoint(str(out)).endswith("step_000012")
    assert {"loss.png", "expert_load.png", "metrics.jsonl", "train_config.json"} <= set(os.listdir(out))
    cfg, state = load_canonical(latest_checkpoint(str(out)))
    assert cfg == TINY
    _, meta = load_train_state(latest_checkpoint(str(out)))
    assert meta["step"] == 12 and meta["samples_seen"] == 48


def test_driver_resume_reproduces_uninterrupted_run(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setattr("dsv3.training.model_config", lambda t: TINY)
    train(_tcfg(tmp_path / "full"), _make, corpus=small_corpus, quiet=True)
    full = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    # a run stopped by a non-finite loss at step 10 keeps its step-8 checkpoint; resuming reproduces the rest
    part = _tcfg(tmp_path / "cut")
    with pytest.raises(NonFiniteLoss, match="step 10.*step_000008"):
        train(part, lambda c, t: NumpyBackend(c, t, nan_at=10), corpus=small_corpus, quiet=True)
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step_000008")
    train(part, _make, resume=True, corpus=small_corpus, quiet=True)
    cut = read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_s")} for r in rs]
    assert strip(cut) == strip(full)


@pytest.mark.parametrize("dtype,hardware,warned", [("bfloat16", False, True), ("bfloat16", True, False),
                                                   ("bfloat16", None, False), ("float32", False, False)])
def test_driver_warns_of_bf16_on_a_cpu_without_bf16_arithmetic(tmp_path, small_corpus, monkeypatch, capsys,
                                                               dtype, hardware, warned):
    """--dtype bfloat16 on a CPU whose /proc/cpuinfo flags have neither AVX-512 BF16 nor AMX-BF16 (False)
    prints a warning at the start of the run, before the first step; with the hardware, with an unknown CPU
    (None, no cpuinfo) or in fp32 it does not. The run trains either way."""
    from dsv3 import runtime
    from dsv3.training import BF16_WITHOUT_HARDWARE

    monkeypatch.setattr("dsv3.training.model_config", lambda t: TINY)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: hardware)
    train(_tcfg(tmp_path / "run", dtype=dtype, steps=2, eval_every=2, save_every=2), _make, corpus=small_corpus,
          quiet=False)
    err = capsys.readouterr().err
    assert (BF16_WITHOUT_HARDWARE in err) == warned
    assert "done: step 2" in err


def test_bf16_warning_follows_the_backends_device(monkeypatch):
    """The torch backends compute where their ``device`` is (the single-device one has none: the CPU): a
    sharded run on CUDA gets no CPU warning."""
    from types import SimpleNamespace

    from dsv3 import runtime
    from dsv3.training import bf16_without_hardware

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    t = _tcfg("unused", dtype="bfloat16")
    assert bf16_without_hardware(t, object())
    assert bf16_without_hardware(t, SimpleNamespace(device="cpu"))
    assert not bf16_without_hardware(t, SimpleNamespace(device="cuda:0"))
