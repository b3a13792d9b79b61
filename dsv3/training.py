"""The framework-free training loop shared by `dsv3_torch.train` and `dsv3_jax.train`.

A framework supplies a *backend* object (see `Backend`) that owns the model and
optimizer and runs one optimizer step; everything else is here or in the
modules this one drives: the run's configuration, schedule and decay rule
(`dsv3.train_config`), the run directory, checkpoints, resume state and
metrics log (`dsv3.rundir`) and the plots (`dsv3.plots`).

The paper's rules (docs/reference.md §8): the aux-loss-free bias update is applied by
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

from dsv3 import runtime
from dsv3.config import ModelConfig
from dsv3.fileio import atomic_write_json
from dsv3.flops import param_counts
from dsv3.plots import plot_expert_load, plot_losses, router_names
from dsv3.rundir import (
    MetricsLog, RunDirError, RunLock, checkpoints, clear_run, load_train_state, read_metrics, remove_leftovers,
    run_files, save_train_state, write_checkpoint,
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
    """A step's loss or gradient norm (or a validation loss) was not finite; the weights were left as they were."""


@dataclass
class RunResult:
    steps_done: int
    checkpoint: Optional[str]
    final_val_loss: Optional[float]
    final_val_mtp_loss: Optional[float]
    final_train_loss: Optional[float]
    wall_s: float
    records: list = field(default_factory=list)
    resumed_from: Optional[str] = None
    skipped_checkpoints: list = field(default_factory=list)  # (directory, why) newer ones passed over on resume


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


def is_writer_process() -> bool:
    """False on every rank but 0 of a multi-process job (torchrun's RANK, JAX's JAX_PROCESS_ID): they neither log nor write
    the run directory's files; a sharded backend writes their checkpoint shards itself."""
    return int(os.environ.get("RANK", os.environ.get("JAX_PROCESS_ID", "0"))) == 0


class _NoLog:
    """The metrics log of a rank that does not write one."""

    path = os.devnull

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------- resume
def _all_finite(arrays) -> bool:
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind == "f" or a.dtype.kind == "V" or "float" in str(a.dtype):
            if not np.isfinite(a.astype(np.float32, copy=False)).all():
                return False
    return True


def _finite_or_none(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


@dataclass
class _ResumePoint:
    directory: str
    meta: dict
    state: dict
    optimizer: dict
    skipped: list


def _verify_checkpoint(directory: str, cfg: ModelConfig, tcfg: TrainConfig) -> _ResumePoint:
    """Load a checkpoint completely (train state, config, model) and check it is finite and usable.

    Raises ValueError for a checkpoint of the other framework (no other checkpoint of the run can do
    better); any other problem raises `_Unusable` with the reason.
    """
    from dsv3.checkpoint import load_canonical

    try:
        tensors, meta = load_train_state(directory)
        old = TrainConfig.from_dict(meta["train_config"])
        int(meta["step"])
    except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise _Unusable(f"train state unreadable ({type(err).__name__}: {err})") from None
    if old.framework != tcfg.framework:
        raise ValueError(f"--resume: the checkpoint was trained with {old.framework}; its optimizer "
                         f"state cannot continue in {tcfg.framework}")
    if meta.get("non_finite_next_step") is not None:
        raise _Unusable(f"the step after it (step {meta['non_finite_next_step']}) had a non-finite loss")
    if not _finite_or_none(meta.get("val_loss")):
        raise _Unusable(f"its validation loss is {meta.get('val_loss')}")
    try:  # load_canonical also refuses NaN or infinite weights (CheckpointError, naming the tensors)
        _, state = load_canonical(directory, cfg)
    except Exception as err:  # noqa: BLE001
        raise _Unusable(f"model unreadable ({type(err).__name__}: {err})") from None
    if not _all_finite(tensors.values()):
        raise _Unusable("its optimizer state is not finite")
    return _ResumePoint(directory, meta, state, tensors, [])


class _Unusable(Exception):
    pass


def _resume_point(tcfg: TrainConfig, cfg: ModelConfig, quiet: bool) -> _ResumePoint:
    """The newest checkpoint of the run that loads completely; newer broken ones are named with the reason."""
    cands = checkpoints(tcfg.out)
    if not cands:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {tcfg.out!r} (no step_* directory)")
    skipped = []
    for d in cands:
        try:
            point = _verify_checkpoint(d, cfg, tcfg)
        except _Unusable as why:
            skipped.append((d, str(why)))
            _message(f"--resume: skipping {d}: {why}", quiet)
            continue
        point.skipped = skipped
        return point
    raise FileNotFoundError(f"--resume: no intact checkpoint in {tcfg.out!r}: "
                            + "; ".join(f"{os.path.basename(d)}: {why}" for d, why in skipped))


def _check_resume_data(meta: dict, corpus, tcfg: TrainConfig) -> None:
    saved = meta.get("data", {}).get("fingerprint")
    if saved is not None and saved != corpus.fingerprint:
        raise ValueError(f"--resume: the data differ from the checkpoint's (fingerprint {corpus.fingerprint} "
                         f"vs {saved}); the run cannot continue exactly")
    if int(meta["step"]) > tcfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {int(meta['step'])}, beyond --steps {tcfg.steps}")


def _restore(backend: Backend, point: _ResumePoint) -> None:
    if hasattr(backend, "restore_checkpoint"):  # a sharded backend reads its own shards
        backend.restore_checkpoint(point.directory)
        return
    backend.load_canonical_state(point.state)
    backend.load_optimizer_state(point.optimizer)


def _announce(tcfg: TrainConfig, cfg: ModelConfig, corpus, quiet: bool) -> None:
    _message(f"dsv3 train: {tcfg.framework}, {tcfg.config or tcfg.preset} "
             f"({param_counts(cfg).total / 1e6:.2f}M params), "
             f"data {corpus.source} ({corpus.n_bytes / 1e6:.2f} MB, unigram entropy "
             f"{corpus.unigram_entropy():.3f} nats/byte), {tcfg.steps} steps x {tcfg.batch_size} x "
             f"{tcfg.seq_len} tokens, gamma={cfg.bias_update_speed} alpha={cfg.balance_loss_alpha} "
             f"lambda={cfg.mtp_loss_weight}, {tcfg.dtype} -> {tcfg.out}", quiet)


BF16_WITHOUT_HARDWARE = (
    "dsv3 train: warning: --dtype bfloat16 on a CPU without AVX-512 BF16 or AMX (its /proc/cpuinfo flags): its "
    "bf16 products have no hardware support, and a bf16 step can take many times an fp32 one (a peer-small "
    "torch step took 11 s against 0.45 s in fp32 on such a CPU, docs/bench/README.md); --dtype float32 "
    "trains faster here")


def bf16_without_hardware(tcfg: TrainConfig, backend=None) -> bool:
    """Whether this run computes in bf16 on a CPU that has no bf16 arithmetic (``runtime.cpu_has_bf16``):
    dsv3_torch's single-device backend computes on the CPU, its sharded one on ``backend.device``, dsv3_jax
    on JAX's default backend."""
    if tcfg.dtype != "bfloat16" or runtime.cpu_has_bf16() is not False:
        return False
    if tcfg.framework == "jax":
        import jax

        return jax.default_backend() == "cpu"
    return str(getattr(backend, "device", "cpu")).startswith("cpu")


# ------------------------------------------------------------------- driver
class _Run:
    """One run in progress: the backend, data, metrics log, progress bar and last results."""

    def __init__(self, tcfg: TrainConfig, cfg: ModelConfig, backend: Backend, corpus, data: tuple,
                 start_step: int, resume_from: Optional[str], quiet: bool):
        self.tcfg, self.cfg, self.backend, self.corpus = tcfg, cfg, backend, corpus
        self.sampler, self.val = data  # BatchSampler, validation batches
        self.writer = getattr(backend, "is_writer", True)
        self.log = (MetricsLog(os.path.join(tcfg.out, "metrics.jsonl"), resume_step=start_step if resume_from else None)
                    if self.writer else _NoLog())
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
        # A sharded backend's rank reads only its rows of each micro-batch.
        lo, n = self.backend.data_slice(mb) if hasattr(self.backend, "data_slice") else (0, mb)
        micro = [self.sampler.batch(first + j * mb + lo, n) for j in range(tcfg.grad_accum)]
        lr = lr_at(step, tcfg)
        # The backend applies no update when the loss or the gradient norm is not finite (the weights,
        # optimizer state and router biases stay as they were); the run stops here.
        res = self.backend.train_step(micro, lr)
        rec = train_record(step + 1, lr, res, time.perf_counter() - t0, tcfg.tokens_per_step)
        self._check_finite(rec)
        self.log.write(rec)
        self.last_train = rec
        done = step + 1
        evaluated = done % tcfg.eval_every == 0 or done == tcfg.steps
        if evaluated:
            self.last_eval = evaluate(self.backend, self.val)
            self.log.write({"kind": "eval", "step": done, **self.last_eval})
            self._check_finite_eval(done, self.last_eval)
        self._progress(rec)
        if done % tcfg.save_every == 0 or done == tcfg.steps:
            # every checkpoint records its validation loss (evaluated now if this is no evaluation step)
            val = self.last_eval if evaluated else evaluate(self.backend, self.val)
            self._check_finite_eval(done, val)
            self.last_ckpt = self.save(done, val)
            self.draw()

    _LOSS_KEYS = ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm")

    def _check_finite(self, rec: dict) -> None:
        if all(math.isfinite(rec[k]) for k in ("loss", "main_loss", "grad_norm") if k in rec):
            return
        bad = {k: rec[k] for k in self._LOSS_KEYS if k in rec}
        self._stop(rec["step"], f"non-finite loss at step {rec['step']} ({bad}); stopped, the step was not "
                                f"applied (the weights are those after step {rec['step'] - 1})",
                   bad_weights_step=rec["step"] - 1)

    def _check_finite_eval(self, step: int, ev: dict) -> None:
        if all(math.isfinite(v) for v in ev.values()):
            return
        self._stop(step, f"non-finite loss at step {step} (validation after the step: {ev}); stopped, no "
                         f"checkpoint is written from these weights", bad_weights_step=step)

    def _stop(self, step: int, what: str, bad_weights_step: int) -> None:
        """Raise NonFiniteLoss naming the newest checkpoint whose weights and validation loss are finite.

        The weights after step ``bad_weights_step`` produced the non-finite value: a checkpoint of that
        step is marked in its train_state.json so that --resume passes over it.
        """
        tcfg = self.tcfg
        good, good_val = None, None
        for d in checkpoints(tcfg.out):
            try:
                _, meta = load_train_state(d)
                st = int(meta["step"])
            except Exception:  # noqa: BLE001 - an unreadable checkpoint is not a good one
                continue
            if st >= bad_weights_step:
                if st == bad_weights_step and meta.get("non_finite_next_step") is None:
                    meta["non_finite_next_step"] = step if bad_weights_step < step else step + 1
                    try:
                        atomic_write_json(os.path.join(d, "train_state.json"), meta, indent=2, sort_keys=True)
                    except OSError:
                        pass
                continue
            if meta.get("non_finite_next_step") is not None or not _finite_or_none(meta.get("val_loss")):
                continue
            good, good_val = d, meta.get("val_loss")
            break
        hint = f"lower --lr (now {tcfg.lr:g})"
        if tcfg.dtype == "bfloat16":
            hint += " or --dtype float32"
        if tcfg.grad_clip <= 0:
            hint += ", or clip gradients with --grad-clip"
        where = ("The last good checkpoint (finite weights and validation loss"
                 + (f" {good_val:.4f}" if good_val is not None else "") + f") is {good}" if good
                 else "There is no last good checkpoint (none with finite weights and validation loss)")
        raise NonFiniteLoss(f"{what}. {where}. Try a {hint}.")

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

    def save(self, step: int, val: Optional[dict] = None) -> str:
        tcfg, corpus = self.tcfg, self.corpus
        if not _all_finite(self.backend.canonical_state().values()):  # never write non-finite weights
            self._stop(step, f"non-finite weights after step {step}; stopped, no checkpoint is written from them",
                       bad_weights_step=step)
        meta: dict[str, Any] = {
            "step": step, "val_loss": (val or {}).get("val_loss"), "weights_finite": True, "samples_seen": step * tcfg.batch_size, "seed": tcfg.seed,
            "framework": tcfg.framework, "train_config": tcfg.to_dict(),
            "data": {"source": corpus.source, "fingerprint": corpus.fingerprint,
                     "epoch": self.sampler.epoch_of(step * tcfg.batch_size)},
            "rng": "data order is a pure function of (seed, samples_seen); training uses no other randomness",
        }

        def write_into(d: str) -> None:
            self.backend.save_pretrained(d)
            save_train_state(d, self.backend.optimizer_state(), meta)

        if hasattr(self.backend, "write_checkpoint"):  # a sharded backend: every rank writes its shards
            return self.backend.write_checkpoint(tcfg.out, step, meta, tcfg.keep_checkpoints)
        return write_checkpoint(tcfg.out, step, write_into, keep=tcfg.keep_checkpoints)

    def draw(self) -> None:
        tcfg = self.tcfg
        if tcfg.plots and self.writer:
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
          resume: bool = False, overwrite: bool = False, corpus=None, quiet: bool = False) -> RunResult:
    """Run (or resume) training; returns a summary. Raises NonFiniteLoss after keeping the last checkpoint.

    The run holds ``<out>/.lock`` throughout (`dsv3.rundir.RunLock`): a second run on the same directory
    raises `RunDirError` naming the holder's pid. Without ``resume``, a directory that already holds a run
    is refused unless ``overwrite`` (which removes that run's files first).
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    # Rank 0 of a multi-process job owns the directory; the other ranks write only their checkpoint shards.
    lock = RunLock(tcfg.out).acquire() if is_writer_process() else None
    try:
        return _train_locked(tcfg, make_backend, resume, overwrite, corpus, quiet)
    finally:
        if lock is not None:
            lock.release()


def _claim_run_dir(tcfg: TrainConfig, resume: bool, overwrite: bool, quiet: bool) -> None:
    """Clear what a killed run left; refuse a directory that holds a run unless resuming or overwriting."""
    remove_leftovers(tcfg.out)  # of a killed run: this run holds the lock, no other can be writing them
    if resume:
        return
    old = run_files(tcfg.out)
    if old and not overwrite:
        shown = ", ".join(old[:6]) + (f", ... ({len(old)} entries)" if len(old) > 6 else "")
        raise RunDirError(f"{tcfg.out!r} already holds a run ({shown}); continue it with --resume, "
                          f"or replace it with --overwrite (deletes those files), or choose another --out")
    if old:
        clear_run(tcfg.out)
        _message(f"--overwrite: removed the previous run's files from {tcfg.out} ({len(old)} entries)", quiet)


def _train_locked(tcfg: TrainConfig, make_backend, resume: bool, overwrite: bool, corpus, quiet: bool) -> RunResult:
    from dsv3.data import BatchSampler, eval_batches, load_corpus

    t_start = time.time()
    quiet = quiet or not is_writer_process()
    if is_writer_process():  # the other ranks of a multi-process job write only their checkpoint shards
        _claim_run_dir(tcfg, resume, overwrite, quiet)
    cfg = model_config(tcfg)
    point = _resume_point(tcfg, cfg, quiet) if resume else None
    resume_from = point.directory if point else None
    meta = point.meta if point else {}
    start_step = int(meta["step"]) if resume_from else 0
    corpus = corpus if corpus is not None else load_corpus(tcfg.data)
    if cfg.vocab_size < 256:
        raise ValueError(f"byte-level data needs vocab_size >= 256; the model has {cfg.vocab_size}")
    if resume_from is not None:
        _check_resume_data(meta, corpus, tcfg)
    data = (BatchSampler(corpus.train, tcfg.seq_len, tcfg.seed),
            eval_batches(corpus.val, tcfg.seq_len, tcfg.micro_batch_size, tcfg.eval_batches))
    if is_writer_process():
        atomic_write_json(os.path.join(tcfg.out, "train_config.json"), tcfg.to_dict(), indent=2)
    _announce(tcfg, cfg, corpus, quiet)
    backend = make_backend(cfg, tcfg)
    if bf16_without_hardware(tcfg, backend):
        _message(BF16_WITHOUT_HARDWARE, quiet)
    if point is not None:
        _restore(backend, point)
        why = "".join(f"; skipped the newer {os.path.basename(d)}: {r}" for d, r in point.skipped)
        _message(f"resumed from {resume_from} at step {start_step}{why}", quiet)
    run = _Run(tcfg, cfg, backend, corpus, data, start_step, resume_from, quiet)
    try:
        for step in range(start_step, tcfg.steps):
            run.step(step)
    finally:
        run.close()
    res = run.result(time.time() - t_start, quiet)
    res.resumed_from = resume_from
    res.skipped_checkpoints = list(point.skipped) if point else []
    return res
