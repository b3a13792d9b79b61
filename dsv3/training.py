"""The framework-free training loop shared by `dsv3_torch.train` and `dsv3_jax.train`.

A framework supplies a *backend* object (see `Backend`) that owns the model and
optimizer and runs one optimizer step; everything else is here or in the
modules this one drives: the run's configuration, schedule and decay rule
(`dsv3.train_config`), the run directory, checkpoints, resume state and
metrics log (`dsv3.rundir`) and the plots (`dsv3.plots`).

The paper's rules (REFERENCE §8): the aux-loss-free bias update is applied by
the backend once per optimizer step, from the expert counts of ALL its
micro-batches summed, never from evaluation passes, never by the optimizer;
the sequence-wise balance loss (α) and the MTP loss (λ) are part of the
model's `compute_loss`. γ, α and λ default to the ModelConfig's values.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from dsv3.config import ModelConfig
from dsv3.fileio import atomic_write_json
from dsv3.flops import param_counts
from dsv3.plots import plot_expert_load, plot_losses, router_names
from dsv3.rundir import (
    MetricsLog, latest_checkpoint, load_train_state, read_metrics, save_train_state, write_checkpoint,
)
from dsv3.train_config import TrainConfig, lr_at, model_config

Batch = tuple[np.ndarray, np.ndarray]


# ------------------------------------------------------------------ backend
class Backend(Protocol):
    """What a framework provides to the loop driver (dsv3_torch.train / dsv3_jax.train)."""

    model_cfg: ModelConfig

    def train_step(self, micro_batches: Sequence[Batch], lr: float) -> dict:
        """One optimizer step: gradients of every micro-batch averaged, clipped, AdamW at ``lr``,
        then ONE router-bias update from the counts summed over the micro-batches.
        Returns floats loss, main_loss, mtp_loss, mtp_depth_loss, balance_loss, grad_norm
        and ``counts`` (np.ndarray [n_router_layers, E], summed)."""

    def eval_step(self, input_ids: np.ndarray, labels: np.ndarray) -> dict:
        """Losses without any state change: main_loss, mtp_depth_loss (floats)."""

    def canonical_state(self) -> dict[str, np.ndarray]: ...

    def load_canonical_state(self, state: dict[str, np.ndarray]) -> None: ...

    def optimizer_state(self) -> dict[str, np.ndarray]: ...

    def load_optimizer_state(self, tensors: dict[str, np.ndarray]) -> None: ...

    def save_pretrained(self, directory: str) -> None: ...


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunResult:
    steps_done: int
    checkpoint: Optional[str]
    final_val_loss: Optional[float]
    final_val_mtp_loss: Optional[float]
    final_train_loss: Optional[float]
    wall_s: float
    records: list = field(default_factory=list)


# ------------------------------------------------------------------ metrics
def load_ratio(counts: np.ndarray) -> np.ndarray:
    """Per router layer: max over experts of tokens per expert / mean (1.0 = perfectly balanced)."""
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    return np.where(mean > 0, c.max(axis=-1) / np.maximum(mean, 1e-30), 1.0)


def train_record(step: int, lr: float, res: dict, dt: float, tokens_per_step: int) -> dict:
    """The metrics.jsonl record of optimizer step ``step`` (1-based) from the backend's result."""
    counts = np.asarray(res["counts"])
    ratio = load_ratio(counts)
    return {"kind": "train", "step": step, "lr": lr,
            **{k: float(res[k]) for k in ("loss", "main_loss", "mtp_loss", "mtp_depth_loss", "balance_loss",
                                          "grad_norm") if res.get(k) is not None},
            "tokens_per_s": tokens_per_step / dt, "step_s": dt,
            "imbalance": float(ratio.mean()) if ratio.size else 1.0,
            "load_ratio": [round(float(x), 4) for x in ratio],
            "counts": counts.astype(np.int64).tolist()}


def evaluate(backend: Backend, batches: Sequence[Batch]) -> dict:
    main, mtp = [], []
    for x, y in batches:
        out = backend.eval_step(x, y)
        main.append(out["main_loss"])
        if out.get("mtp_depth_loss") is not None:
            mtp.append(out["mtp_depth_loss"])
    res = {"val_loss": float(np.mean(main))}
    if mtp:
        res["val_mtp_loss"] = float(np.mean(mtp))
    return res


def _message(msg: str, quiet: bool = False) -> None:
    if not quiet:
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        except ImportError:  # pragma: no cover
            print(msg, file=sys.stderr)


# ------------------------------------------------------------------- resume
def _resume_point(tcfg: TrainConfig) -> tuple[str, dict]:
    """The run's latest checkpoint and its train-state metadata, checked against ``tcfg``."""
    resume_from = latest_checkpoint(tcfg.out)
    if resume_from is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {tcfg.out!r} (no 'latest' file)")
    _, meta = load_train_state(resume_from)
    old = TrainConfig.from_dict(meta["train_config"])
    if old.framework != tcfg.framework:
        raise ValueError(f"--resume: the checkpoint was trained with {old.framework}; its optimizer "
                         f"state cannot continue in {tcfg.framework}")
    return resume_from, meta


def _check_resume_data(meta: dict, corpus, tcfg: TrainConfig) -> None:
    saved = meta.get("data", {}).get("fingerprint")
    if saved is not None and saved != corpus.fingerprint:
        raise ValueError(f"--resume: the data differ from the checkpoint's (fingerprint {corpus.fingerprint} "
                         f"vs {saved}); the run cannot continue exactly")
    if int(meta["step"]) > tcfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {int(meta['step'])}, beyond --steps {tcfg.steps}")


def _restore(backend: Backend, resume_from: str, cfg: ModelConfig) -> None:
    from dsv3.checkpoint import load_canonical

    _, state = load_canonical(resume_from, cfg)
    backend.load_canonical_state(state)
    tensors, _ = load_train_state(resume_from)
    backend.load_optimizer_state(tensors)


def _announce(tcfg: TrainConfig, cfg: ModelConfig, corpus, quiet: bool) -> None:
    _message(f"dsv3 train: {tcfg.framework}, {tcfg.config or tcfg.preset} "
             f"({param_counts(cfg).total / 1e6:.2f}M params), "
             f"data {corpus.source} ({corpus.n_bytes / 1e6:.2f} MB, unigram entropy "
             f"{corpus.unigram_entropy():.3f} nats/byte), {tcfg.steps} steps x {tcfg.batch_size} x "
             f"{tcfg.seq_len} tokens, gamma={cfg.bias_update_speed} alpha={cfg.balance_loss_alpha} "
             f"lambda={cfg.mtp_loss_weight}, {tcfg.dtype} -> {tcfg.out}", quiet)


# ------------------------------------------------------------------- driver
class _Run:
    """One run in progress: the backend, data, metrics log, progress bar and last results."""

    def __init__(self, tcfg: TrainConfig, cfg: ModelConfig, backend: Backend, corpus, data: tuple,
                 start_step: int, resume_from: Optional[str], quiet: bool):
        self.tcfg, self.cfg, self.backend, self.corpus = tcfg, cfg, backend, corpus
        self.sampler, self.val = data  # BatchSampler, validation batches
        self.log = MetricsLog(os.path.join(tcfg.out, "metrics.jsonl"),
                              resume_step=start_step if resume_from else None)
        self.last_ckpt = resume_from
        self.last_eval: dict = {}
        self.last_train: Optional[dict] = None
        self.bar = None
        if tcfg.progress and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int) -> None:
        """Optimizer step ``step`` (0-based), then its evaluation, progress and checkpoint when due."""
        tcfg, mb = self.tcfg, self.tcfg.micro_batch_size
        t0 = time.perf_counter()
        first = step * tcfg.batch_size
        micro = [self.sampler.batch(first + j * mb, mb) for j in range(tcfg.grad_accum)]
        lr = lr_at(step, tcfg)
        res = self.backend.train_step(micro, lr)
        rec = train_record(step + 1, lr, res, time.perf_counter() - t0, tcfg.tokens_per_step)
        self._check_finite(rec)
        self.log.write(rec)
        self.last_train = rec
        done = step + 1
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
            self.last_eval = evaluate(self.backend, self.val)
            self.log.write({"kind": "eval", "step": done, **self.last_eval})
        self._progress(rec)
        if done % tcfg.save_every == 0 or done == tcfg.steps:
            self.last_ckpt = self.save(done)
            self.draw()

    def _check_finite(self, rec: dict) -> None:
        if all(math.isfinite(rec[k]) for k in ("loss", "main_loss") if k in rec):
            return
        bad = {k: rec[k] for k in ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm") if k in rec}
        raise NonFiniteLoss(f"non-finite loss at step {rec['step']} ({bad}); stopped. The last good "
                            f"checkpoint is {self.last_ckpt or 'none (no checkpoint written yet)'}; "
                            f"try a lower --lr or --dtype float32")

    def _progress(self, rec: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{rec['main_loss']:.3f}"}
        if "mtp_depth_loss" in rec:
            post["mtp"] = f"{rec['mtp_depth_loss']:.3f}"
        if self.last_eval:
            post["val"] = f"{self.last_eval['val_loss']:.3f}"
        post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
        post["imb"] = f"{rec['imbalance']:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def save(self, step: int) -> str:
        tcfg, corpus = self.tcfg, self.corpus
        meta: dict[str, Any] = {
            "step": step, "samples_seen": step * tcfg.batch_size, "seed": tcfg.seed,
            "framework": tcfg.framework, "train_config": tcfg.to_dict(),
            "data": {"source": corpus.source, "fingerprint": corpus.fingerprint,
                     "epoch": self.sampler.epoch_of(step * tcfg.batch_size)},
            "rng": "data order is a pure function of (seed, samples_seen); training uses no other randomness",
        }

        def write_into(d: str) -> None:
            self.backend.save_pretrained(d)
            save_train_state(d, self.backend.optimizer_state(), meta)

        return write_checkpoint(tcfg.out, step, write_into, keep=tcfg.keep_checkpoints)

    def draw(self) -> None:
        tcfg = self.tcfg
        if tcfg.plots:
            recs = read_metrics(self.log.path)
            plot_losses(recs, os.path.join(tcfg.out, "loss.png"),
                        title=f"{tcfg.config or tcfg.preset} ({tcfg.framework}), {self.corpus.source}")
            plot_expert_load(recs, os.path.join(tcfg.out, "expert_load.png"), router_names(self.cfg))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.close()

    def result(self, wall: float, quiet: bool) -> RunResult:
        ev = self.last_eval
        if ev:
            _message(f"done: step {self.tcfg.steps}, val loss {ev['val_loss']:.4f} nats/byte"
                     + (f" (MTP {ev['val_mtp_loss']:.4f})" if "val_mtp_loss" in ev else "")
                     + f", unigram entropy {self.corpus.unigram_entropy():.4f}; checkpoint {self.last_ckpt}; "
                     f"{wall:.0f} s", quiet)
        return RunResult(steps_done=self.tcfg.steps, checkpoint=self.last_ckpt, final_val_loss=ev.get("val_loss"),
                         final_val_mtp_loss=ev.get("val_mtp_loss"),
                         final_train_loss=self.last_train["main_loss"] if self.last_train else None, wall_s=wall)


def train(tcfg: TrainConfig, make_backend: Callable[[ModelConfig, TrainConfig], Backend], *,
          resume: bool = False, corpus=None, quiet: bool = False) -> RunResult:
    """Run (or resume) training; returns a summary. Raises NonFiniteLoss after keeping the last checkpoint."""
    from dsv3.data import BatchSampler, eval_batches, load_corpus

    t_start = time.time()
    os.makedirs(tcfg.out, exist_ok=True)
    resume_from, meta = _resume_point(tcfg) if resume else (None, {})
    start_step = int(meta["step"]) if resume_from else 0
    cfg = model_config(tcfg)
    corpus = corpus if corpus is not None else load_corpus(tcfg.data)
    if cfg.vocab_size < 256:
        raise ValueError(f"byte-level data needs vocab_size >= 256; the model has {cfg.vocab_size}")
    if resume_from is not None:
        _check_resume_data(meta, corpus, tcfg)
    data = (BatchSampler(corpus.train, tcfg.seq_len, tcfg.seed),
            eval_batches(corpus.val, tcfg.seq_len, tcfg.micro_batch_size, tcfg.eval_batches))
    atomic_write_json(os.path.join(tcfg.out, "train_config.json"), tcfg.to_dict(), indent=2)
    _announce(tcfg, cfg, corpus, quiet)
    backend = make_backend(cfg, tcfg)
    if resume_from is not None:
        _restore(backend, resume_from, cfg)
        _message(f"resumed from {resume_from} at step {start_step}", quiet)
    run = _Run(tcfg, cfg, backend, corpus, data, start_step, resume_from, quiet)
    try:
        for step in range(start_step, tcfg.steps):
            run.step(step)
    finally:
        run.close()
    return run.result(time.time() - t_start, quiet)
