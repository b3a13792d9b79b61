"""Framework-free training logic shared by `dsv3_torch.train` and `dsv3_jax.train`.

Everything that must be identical in both frameworks lives here: the training
configuration, the learning-rate schedule (one plain function), the weight
decay rule, metrics, plots, the checkpoint-directory layout, the resume state
format and the loop driver. A framework supplies a *backend* object (see
`Backend`) that owns the model and optimizer and runs one optimizer step.

The paper's rules (REFERENCE §8): the aux-loss-free bias update is applied by
the backend once per optimizer step, from the expert counts of ALL its
micro-batches summed, never from evaluation passes, never by the optimizer;
the sequence-wise balance loss (α) and the MTP loss (λ) are part of the
model's `compute_loss`. γ, α and λ default to the ModelConfig's values.

Checkpoint directory (``--out``)::

    train_config.json      the TrainConfig of the run
    metrics.jsonl          one JSON object per step ("train") and per evaluation ("eval")
    loss.png               train / validation loss, main and MTP
    expert_load.png        per MoE layer: tokens per expert / mean, over training
    latest                 text file naming the newest complete checkpoint, e.g. "step_000500"
    step_000500/           config.json + model.safetensors (HF layout; from_pretrained loads it)
                           train_state.safetensors + train_state.json (optimizer state, step,
                           data position, seed); the router biases are in model.safetensors

A checkpoint directory is written completely under a temporary name, renamed
into place, and only then named by ``latest`` (atomic rename), so a killed run
always leaves the previous complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from dsv3.checkpoint import atomic_write_bytes, atomic_write_text
from dsv3.config import ModelConfig

FRAMEWORKS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """One training run. Defaults are the README's main command (JAX, `small`, 2 CPU cores, ~10 min)."""

    framework: str = "jax"
    preset: str = "small"
    config: Optional[str] = None  # a config.json (HF layout) replacing the preset
    data: Optional[str] = None  # text file or folder; None = the default corpus
    out: str = "runs/small-jax"
    steps: int = 450
    batch_size: int = 8  # sequences per optimizer step (all micro-batches together)
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (fp32 master weights)
    seed: int = 0
    # The paper's rules; None = the ModelConfig's value.
    bias_update_speed: Optional[float] = None  # gamma
    balance_loss_alpha: Optional[float] = None  # alpha
    mtp_loss_weight: Optional[float] = None  # lambda
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    compile: bool = False  # torch.compile (torch only)
    mesh: Optional[str] = None  # JAX only: a device mesh "data=2,fsdp=2,expert=2" (dsv3_jax.sharding)
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig.{name}: {msg} (got {getattr(self, name)!r})")

        need(self.framework in FRAMEWORKS, "framework", f"must be one of {FRAMEWORKS}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "save_every", "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.batch_size % self.grad_accum == 0, "batch_size",
             f"must be divisible by grad_accum={self.grad_accum}")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        for name in ("bias_update_speed", "balance_loss_alpha", "mtp_loss_weight"):
            v = getattr(self, name)
            need(v is None or v >= 0, name, "must be >= 0")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}")
        return cls(**d)


def model_config(tcfg: TrainConfig) -> ModelConfig:
    """The run's ModelConfig: preset or config.json, with CLI overrides of γ, α, λ."""
    cfg = ModelConfig.from_pretrained(tcfg.config) if tcfg.config else ModelConfig.preset(tcfg.preset)
    over = {k: getattr(tcfg, k) for k in ("bias_update_speed", "balance_loss_alpha", "mtp_loss_weight")
            if getattr(tcfg, k) is not None}
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len={tcfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    return cfg.replace(**over) if over else cfg


# ----------------------------------------------------------------- schedule
def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warm-up from lr/warmup to lr over ``warmup_steps`` steps, then cosine
    decay from lr to ``lr * min_lr_ratio`` at the last step.
    """
    peak, floor = tcfg.lr, tcfg.lr * tcfg.min_lr_ratio
    if step < tcfg.warmup_steps:
        return peak * (step + 1) / tcfg.warmup_steps
    decay = max(tcfg.steps - 1 - tcfg.warmup_steps, 1)
    t = min(max(step - tcfg.warmup_steps, 0) / decay, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


def decays(name: str, ndim: int) -> bool:
    """AdamW weight decay rule, by canonical-style parameter path.

    Matrices and expert stacks decay; norm weights (every 1-D weight of the model
    is an RMSNorm: attn_norm, ffn_norm, q_norm, kv_norm, norm, enorm, hnorm) and
    the router's correction bias do not. The name test keeps the rule right when
    a framework stacks layers (a stacked norm weight is 2-D).
    """
    parts = name.replace("/", ".").split(".")
    if "bias" in parts or any(p.endswith("norm") for p in parts):
        return False
    return ndim >= 2


# ------------------------------------------------------------------ metrics
def load_ratio(counts: np.ndarray) -> np.ndarray:
    """Per router layer: max over experts of tokens per expert / mean (1.0 = perfectly balanced)."""
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    return np.where(mean > 0, c.max(axis=-1) / np.maximum(mean, 1e-30), 1.0)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: ignore it
                    pass
    return out


class MetricsLog:
    """metrics.jsonl: appended line by line; on resume, cut back to the checkpoint's step."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
        else:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# -------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_losses(records: Sequence[dict], path: str, title: str = "") -> None:
    """Train (main, MTP) and validation (main, MTP) loss in nats per byte over steps."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if train:
        s = np.array([r["step"] for r in train])
        for key, label, color in (("main_loss", "train main", "C0"), ("mtp_depth_loss", "train MTP (depth 1)", "C1")):
            y = np.array([r.get(key, np.nan) for r in train], dtype=float)
            if np.isfinite(y).any():
                ax.plot(s, y, color=color, alpha=0.25, lw=0.8)
                k = max(1, len(y) // 50)
                if k > 1:
                    sm = np.convolve(y, np.ones(k) / k, mode="valid")
                    ax.plot(s[k - 1:], sm, color=color, lw=1.6, label=label + f" ({k}-step mean)")
                else:
                    ax.plot(s, y, color=color, lw=1.6, label=label)
    if evals:
        s = [r["step"] for r in evals]
        ax.plot(s, [r["val_loss"] for r in evals], "o-", color="C3", label="validation main")
        if any("val_mtp_loss" in r for r in evals):
            ax.plot(s, [r.get("val_mtp_loss", np.nan) for r in evals], "s--", color="C2", label="validation MTP")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)


def plot_expert_load(records: Sequence[dict], path: str, router_names: Optional[Sequence[str]] = None,
                     max_columns: int = 200) -> None:
    """Heat map per router layer: tokens routed to each expert / mean, over training."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train" and r.get("counts") is not None]
    if not train:
        return
    counts = np.array([r["counts"] for r in train], dtype=np.float64)  # [S, R, E]
    steps = np.array([r["step"] for r in train])
    S, R, E = counts.shape
    bins = np.array_split(np.arange(S), min(S, max_columns))
    binned = np.stack([counts[b].sum(0) for b in bins])  # [S', R, E]
    rel = binned / np.maximum(binned.mean(-1, keepdims=True), 1e-30)
    edges = [steps[b[0]] for b in bins] + [steps[bins[-1][-1]] + 1]
    fig, axes = plt.subplots(R, 1, figsize=(8, 1.2 + 1.6 * R), squeeze=False, sharex=True)
    vmax = max(2.0, float(np.percentile(rel, 99)))
    for r in range(R):
        ax = axes[r, 0]
        im = ax.pcolormesh(edges, np.arange(E + 1), rel[:, r, :].T, cmap="magma", vmin=0.0, vmax=vmax,
                           shading="flat")
        name = router_names[r] if router_names else f"router {r}"
        ratio = rel[-1, r].max()
        ax.set_ylabel(f"{name}\nexpert", fontsize=8)
        ax.set_title(f"{name}: last max/mean = {ratio:.2f}", fontsize=8, loc="left")
        fig.colorbar(im, ax=ax, pad=0.01, label="load / mean")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle("expert load (tokens per expert / mean); 1 = balanced", fontsize=10)
    _save_fig(fig, path)
    plt.close(fig)


def router_names(cfg: ModelConfig) -> list[str]:
    names = [f"layers.{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return names + [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)]


# -------------------------------------------------------- checkpoint layout
def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(out: str) -> Optional[str]:
    """The newest complete checkpoint directory of a run, or None."""
    p = os.path.join(out, "latest")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        name = f.read().strip()
    d = os.path.join(out, name)
    return d if os.path.isdir(d) else None


def resolve_weights_dir(path: str) -> str:
    """A run directory (follows ``latest``) or a weights directory with config.json."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    d = latest_checkpoint(path)
    if d is None:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint (no config.json) nor a run directory "
                                f"with a 'latest' checkpoint")
    return d


def write_checkpoint(out: str, step: int, write_into: Callable[[str], None], keep: int = 2) -> str:
    """Write a complete checkpoint atomically; returns its directory.

    ``write_into(tmpdir)`` writes every file; the directory is then renamed to
    ``step_NNNNNN`` and ``latest`` is re-pointed (atomic rename). Older
    checkpoints beyond ``keep`` are removed afterwards.
    """
    os.makedirs(out, exist_ok=True)
    name = checkpoint_name(step)
    final = os.path.join(out, name)
    tmp = os.path.join(out, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write_into(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
            old = os.path.join(out, f".old-{name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(out, "latest"), name + "\n")
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
            atomic_write_text(os.path.join(out, "latest"), name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("step_") and os.path.isdir(os.path.join(out, d)))
    for d in ckpts[:-keep] if keep > 0 else []:
        if d != name:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    for d in os.listdir(out):  # leftovers of killed runs
        if d.startswith((".tmp-step_", ".old-step_")) and not d.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def save_train_state(directory: str, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """train_state.safetensors (optimizer tensors) + train_state.json (scalars); no pickle."""
    from safetensors.numpy import save

    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d arrays into [1]
    blob = save({k: np.asarray(v, order="C") for k, v in tensors.items()}) if tensors else save(
        {"__empty__": np.zeros(0, np.float32)})
    atomic_write_bytes(os.path.join(directory, "train_state.safetensors"), blob)
    atomic_write_text(os.path.join(directory, "train_state.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_train_state(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load

    tpath = os.path.join(directory, "train_state.safetensors")
    jpath = os.path.join(directory, "train_state.json")
    if not (os.path.exists(tpath) and os.path.exists(jpath)):
        raise FileNotFoundError(f"{directory!r} has no train_state.safetensors / train_state.json to resume from")
    with open(tpath, "rb") as f:  # safetensors.numpy.load keeps 0-d shapes (load_file turns them into [1])
        tensors = load(f.read())
    tensors.pop("__empty__", None)
    with open(jpath) as f:
        meta = json.load(f)
    return tensors, meta


# ------------------------------------------------------------------ backend
class Backend(Protocol):
    """What a framework provides to the loop driver (dsv3_torch.train / dsv3_jax.train)."""

    model_cfg: ModelConfig

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float) -> dict:
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


# ------------------------------------------------------------------- driver
@dataclass
class RunResult:
    steps_done: int
    checkpoint: Optional[str]
    final_val_loss: Optional[float]
    final_val_mtp_loss: Optional[float]
    final_train_loss: Optional[float]
    wall_s: float
    records: list = field(default_factory=list)


def evaluate(backend: Backend, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
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


def train(tcfg: TrainConfig, make_backend: Callable[[ModelConfig, TrainConfig], Backend], *,
          resume: bool = False, corpus=None, quiet: bool = False) -> RunResult:
    """Run (or resume) training; returns a summary. Raises NonFiniteLoss after keeping the last checkpoint."""
    from dsv3.data import BatchSampler, eval_batches, load_corpus

    t_start = time.time()
    out = tcfg.out
    os.makedirs(out, exist_ok=True)
    start_step, resume_from = 0, None
    if resume:
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {out!r} (no 'latest' file)")
        _, meta = load_train_state(resume_from)
        old = TrainConfig.from_dict(meta["train_config"])
        if old.framework != tcfg.framework:
            raise ValueError(f"--resume: the checkpoint was trained with {old.framework}; its optimizer "
                             f"state cannot continue in {tcfg.framework}")
        start_step = int(meta["step"])
    cfg = model_config(tcfg)
    corpus = corpus if corpus is not None else load_corpus(tcfg.data)
    if cfg.vocab_size < 256:
        raise ValueError(f"byte-level data needs vocab_size >= 256; the model has {cfg.vocab_size}")
    if resume_from is not None:
        saved = meta.get("data", {}).get("fingerprint")
        if saved is not None and saved != corpus.fingerprint:
            raise ValueError(f"--resume: the data differ from the checkpoint's (fingerprint {corpus.fingerprint} "
                             f"vs {saved}); the run cannot continue exactly")
        if start_step > tcfg.steps:
            raise ValueError(f"--resume: the checkpoint is at step {start_step}, beyond --steps {tcfg.steps}")
    sampler = BatchSampler(corpus.train, tcfg.seq_len, tcfg.seed)
    val = eval_batches(corpus.val, tcfg.seq_len, tcfg.micro_batch_size, tcfg.eval_batches)
    atomic_write_text(os.path.join(out, "train_config.json"), json.dumps(tcfg.to_dict(), indent=2) + "\n")
    _message(f"dsv3 train: {tcfg.framework}, {tcfg.config or tcfg.preset} "
             f"({sum(int(np.prod(s)) for s in _shapes(cfg).values()) / 1e6:.2f}M params), "
             f"data {corpus.source} ({corpus.n_bytes / 1e6:.2f} MB, unigram entropy "
             f"{corpus.unigram_entropy():.3f} nats/byte), {tcfg.steps} steps x {tcfg.batch_size} x "
             f"{tcfg.seq_len} tokens, gamma={cfg.bias_update_speed} alpha={cfg.balance_loss_alpha} "
             f"lambda={cfg.mtp_loss_weight}, {tcfg.dtype} -> {out}", quiet)

    backend = make_backend(cfg, tcfg)
    if resume_from is not None:
        from dsv3.checkpoint import load_canonical

        _, state = load_canonical(resume_from, cfg)
        backend.load_canonical_state(state)
        tensors, meta = load_train_state(resume_from)
        backend.load_optimizer_state(tensors)
        _message(f"resumed from {resume_from} at step {start_step}", quiet)
    log = MetricsLog(os.path.join(out, "metrics.jsonl"), resume_step=start_step if resume_from else None)
    names = router_names(cfg)
    last_ckpt = resume_from
    last_eval: dict = {}
    last_train: Optional[dict] = None

    def save(step: int) -> str:
        def write_into(d: str) -> None:
            backend.save_pretrained(d)
            save_train_state(d, backend.optimizer_state(), {
                "step": step, "samples_seen": step * tcfg.batch_size, "seed": tcfg.seed,
                "framework": tcfg.framework, "train_config": tcfg.to_dict(),
                "data": {"source": corpus.source, "fingerprint": corpus.fingerprint,
                         "epoch": sampler.epoch_of(step * tcfg.batch_size)},
                "rng": "data order is a pure function of (seed, samples_seen); training uses no other randomness",
            })
        return write_checkpoint(out, step, write_into, keep=tcfg.keep_checkpoints)

    def draw() -> None:
        if tcfg.plots:
            recs = read_metrics(log.path)
            plot_losses(recs, os.path.join(out, "loss.png"),
                        title=f"{tcfg.config or tcfg.preset} ({tcfg.framework}), {corpus.source}")
            plot_expert_load(recs, os.path.join(out, "expert_load.png"), names)

    bar = None
    if tcfg.progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    mb = tcfg.micro_batch_size
    try:
        for step in range(start_step, tcfg.steps):
            t0 = time.perf_counter()
            first = step * tcfg.batch_size
            micro = [sampler.batch(first + j * mb, mb) for j in range(tcfg.grad_accum)]
            lr = lr_at(step, tcfg)
            res = backend.train_step(micro, lr)
            dt = time.perf_counter() - t0
            counts = np.asarray(res["counts"])
            ratio = load_ratio(counts)
            rec = {"kind": "train", "step": step + 1, "lr": lr,
                   **{k: float(res[k]) for k in ("loss", "main_loss", "mtp_loss", "mtp_depth_loss", "balance_loss",
                                                 "grad_norm") if res.get(k) is not None},
                   "tokens_per_s": tcfg.tokens_per_step / dt, "step_s": dt,
                   "imbalance": float(ratio.mean()) if ratio.size else 1.0,
                   "load_ratio": [round(float(x), 4) for x in ratio],
                   "counts": counts.astype(np.int64).tolist()}
            if not all(math.isfinite(rec[k]) for k in ("loss", "main_loss") if k in rec):
                bad = {k: rec[k] for k in ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm") if k in rec}
                raise NonFiniteLoss(f"non-finite loss at step {step + 1} ({bad}); stopped. The last good "
                                    f"checkpoint is {last_ckpt or 'none (no checkpoint written yet)'}; "
                                    f"try a lower --lr or --dtype float32")
            log.write(rec)
            last_train = rec
            done = step + 1
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                last_eval = evaluate(backend, val)
                log.write({"kind": "eval", "step": done, **last_eval})
            if bar is not None:
                post = {"loss": f"{rec['main_loss']:.3f}"}
                if "mtp_depth_loss" in rec:
                    post["mtp"] = f"{rec['mtp_depth_loss']:.3f}"
                if last_eval:
                    post["val"] = f"{last_eval['val_loss']:.3f}"
                post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
                post["imb"] = f"{rec['imbalance']:.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if done % tcfg.save_every == 0 or done == tcfg.steps:
                last_ckpt = save(done)
                draw()
    finally:
        if bar is not None:
            bar.close()
        log.close()
    wall = time.time() - t_start
    if last_eval:
        _message(f"done: step {tcfg.steps}, val loss {last_eval['val_loss']:.4f} nats/byte"
                 + (f" (MTP {last_eval['val_mtp_loss']:.4f})" if "val_mtp_loss" in last_eval else "")
                 + f", unigram entropy {corpus.unigram_entropy():.4f}; checkpoint {last_ckpt}; "
                 f"{wall:.0f} s", quiet)
    return RunResult(steps_done=tcfg.steps, checkpoint=last_ckpt, final_val_loss=last_eval.get("val_loss"),
                     final_val_mtp_loss=last_eval.get("val_mtp_loss"),
                     final_train_loss=last_train["main_loss"] if last_train else None, wall_s=wall)


def _shapes(cfg: ModelConfig) -> dict:
    from dsv3.checkpoint import canonical_shapes

    return canonical_shapes(cfg)


def param_counts(cfg: ModelConfig) -> dict:
    """Total parameters (with and without MTP) and parameters active per token.

    Active: everything a token passes through (embedding row excluded from
    neither; it is counted whole, as is customary), but only K of E routed experts.
    The router bias is a buffer, not a parameter.
    """
    shapes = _shapes(cfg)
    total = mtp = routed = 0
    for name, s in shapes.items():
        if name.endswith("gate.bias"):
            continue
        n = int(np.prod(s))
        total += n
        if name.startswith("mtp."):
            mtp += n
        if ".ffn.experts." in name and not name.startswith("mtp."):
            routed += n
    active_routed = routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    main = total - mtp
    return {"total": total, "main": main, "mtp": mtp, "routed_experts": routed,
            "active_per_token": main - routed + active_routed}
