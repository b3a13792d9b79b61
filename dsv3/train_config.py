"""TrainConfig (one training run), its ModelConfig, the learning-rate schedule and the weight-decay rule.

Each field is spelled once: its CLI flag and help text are in the field's
metadata, and ``dsv3 train`` builds its parser from them (`dsv3.cli`).
Metadata keys: ``help``; ``flags`` (default ``--field-name``); ``choices``;
``metavar``; ``group`` (mutually exclusive flags); ``cli_default`` (the
parser's default where it differs, e.g. ``out`` derived from the preset); a
bool field that defaults to True is switched off by ``--no-field-name``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from dsv3.config import PRESETS, ModelConfig, Validator, _Rule, _check

FRAMEWORKS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "dots")  # activation checkpointing per decoder layer (dsv3_jax.model.REMAT_POLICIES)


# The optimizer settings, one rule each (the machinery of ModelConfig): checked by TrainConfig and
# again by each framework's optimizer factory, so torch and JAX refuse the same values alike.
OPTIMIZER_RULES: dict[str, _Rule] = {
    "lr": _Rule("real", 0),
    "beta1": _Rule("real", 0, low_open=False, high=1, high_open=True),
    "beta2": _Rule("real", 0, low_open=False, high=1, high_open=True),
    "eps": _Rule("real", 0),
    "weight_decay": _Rule("real", 0, low_open=False),
    "grad_clip": _Rule("real", 0, low_open=False),  # 0: no clipping
}
# Sizes and counts of the run: positive integers.
_SIZE_RULES: dict[str, _Rule] = {name: _Rule("int", 0) for name in (
    "steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every", "keep_checkpoints")}
# The schedule and the paper's coefficients (None: the ModelConfig's value).
_SCHEDULE_RULES: dict[str, _Rule] = {
    "min_lr_ratio": _Rule("real", 0, low_open=False, high=1),
    "warmup_steps": _Rule("int", 0, low_open=False),
    "bias_update_speed": _Rule("real", 0, low_open=False, nullable=True),
    "balance_loss_alpha": _Rule("real", 0, low_open=False, nullable=True),
    "mtp_loss_weight": _Rule("real", 0, low_open=False, nullable=True),
}


def check_optimizer_args(lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any, grad_clip: Any,
                         where: str = "TrainConfig.") -> None:
    """Raise ValueError "<where><name>: must be ... (got ...)" for a bad AdamW setting.

    lr > 0 and finite, betas in [0, 1), eps > 0, weight_decay >= 0, grad_clip >= 0 (0: off).
    """
    values = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, grad_clip=grad_clip)
    for name, value in values.items():
        _check(where, name, value, OPTIMIZER_RULES[name])


def _opt(default: Any, help: Optional[str] = None, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """One training run. Defaults are the README's main command (JAX, `small`, 2 CPU cores, ~10 min)."""

    framework: str = _opt("jax", choices=FRAMEWORKS)
    preset: str = _opt("small", choices=tuple(sorted(PRESETS)), group="model")
    config: Optional[str] = _opt(None, "HF config.json (file or directory) instead of a preset",
                                 metavar="CONFIG_JSON", group="model")
    data: Optional[str] = _opt(None, "text file or folder (default: the Python standard library's source)",
                               metavar="PATH")
    out: str = _opt("runs/small-jax", "run directory (default runs/<preset>-<framework>)", cli_default=None)
    steps: int = _opt(450, "optimizer steps")
    batch_size: int = _opt(8, "sequences per optimizer step")  # all micro-batches together
    seq_len: int = _opt(256, "tokens (bytes) per sequence")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "cosine floor / peak")  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = _opt(50, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW decay (matrices only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon", flags=("--adam-eps",))
    grad_clip: float = _opt(1.0, "max gradient norm (0: off)")
    dtype: str = _opt("float32", "compute dtype (weights stay fp32)", choices=DTYPES)
    seed: int = _opt(0, "init and data order")
    # The paper's rules; None = the ModelConfig's value.
    bias_update_speed: Optional[float] = _opt(
        None, "aux-loss-free bias update speed (default: the model config's; 0 disables)",
        flags=("--gamma", "--bias-update-speed"))
    balance_loss_alpha: Optional[float] = _opt(
        None, "sequence-wise balance loss weight (default: the model config's)",
        flags=("--alpha", "--balance-loss-alpha"))
    mtp_loss_weight: Optional[float] = _opt(
        None, "MTP loss weight lambda (default: the model config's)", flags=("--mtp-weight", "--mtp-loss-weight"))
    eval_every: int = _opt(100, "steps between validations")
    eval_batches: int = _opt(8, "validation batches")
    save_every: int = _opt(200, "steps between checkpoints")
    keep_checkpoints: int = _opt(2, "checkpoints kept")
    compile: bool = _opt(False, "torch.compile the loss (torch only)")
    scan_layers: bool = _opt(False, "JAX: run the decoder layers as two scanned stacks (dense, MoE): the compile "
                                    "time stays flat in depth; checkpoints unchanged (the torch backend ignores it)")
    remat: str = _opt("none", "JAX: activation checkpointing of each decoder layer: none, full (save nothing) or "
                              "dots (save the weight matmuls' outputs); the torch backend accepts none only",
                      choices=REMATS)
    mesh: Optional[str] = _opt(None, "device mesh over the axes data, fsdp, expert, e.g. data=2,fsdp=2,expert=2 "
                                     "(JAX: one process, see docs/scaling.md, --cpu-devices N on CPU; torch: launch "
                                     "with torchrun --nproc-per-node N -m dsv3 train ...)", metavar="SPEC")
    progress: bool = _opt(True, "no progress bar")
    plots: bool = _opt(True, "no PNG plots")

    def __post_init__(self) -> None:
        need = Validator(self)
        need(self.framework in FRAMEWORKS, "framework", f"must be one of {FRAMEWORKS}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.remat in REMATS, "remat", f"must be one of {REMATS}")
        need(self.framework == "jax" or self.remat == "none", "remat",
             "is a JAX option (the torch backend has no activation checkpointing): use none")
        for name, rule in _SIZE_RULES.items():
            _check("TrainConfig.", name, getattr(self, name), rule)
        need(self.batch_size % self.grad_accum == 0, "batch_size",
             f"must be divisible by grad_accum={self.grad_accum}")
        check_optimizer_args(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.grad_clip)
        for name, rule in _SCHEDULE_RULES.items():
            _check("TrainConfig.", name, getattr(self, name), rule)

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
