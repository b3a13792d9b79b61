"""State shared by every row of one ``dsv3 bench`` run."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from dsv3 import flops
from dsv3.config import ModelConfig

# The training hyper-parameters of every train-step row (docs/reference.md §8.3 shape).
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


@dataclass
class Ctx:
    args: Any
    cfg: ModelConfig  # the benchmarked config (MTP as configured)
    device: str
    dtype: str  # "fp32" | "bf16"
    batch: int
    seq: int
    contexts: list
    decode_batch: int
    decode_steps: int
    warmup: int
    reps: int
    state: dict = field(default_factory=dict)  # canonical weights (numpy, fp32), MTP included
    tokens: Optional[np.ndarray] = None  # [B, T + 1] int32: inputs [:, :-1], labels [:, 1:]
    rows: list = field(default_factory=list)
    peaks: dict = field(default_factory=dict)  # framework -> peak GFLOP/s
    floors: dict = field(default_factory=dict)  # framework -> peak.measure_floor's record
    extra_dtypes: list = field(default_factory=list)  # --bf16-rows: ["bf16"], training rows in that dtype too
    log: Callable[[str], None] = print

    def weights(self, mtp: bool) -> dict:
        if mtp:
            return self.state
        return {k: v for k, v in self.state.items() if not k.startswith("mtp.")}

    def config(self, mtp: bool) -> ModelConfig:
        return self.cfg if mtp else self.cfg.replace(num_nextn_predict_layers=0)

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> np.ndarray:
        return self.tokens[:, 1:]

    @property
    def has_mtp(self) -> bool:
        return self.cfg.num_nextn_predict_layers > 0

    def mtp_settings(self) -> list[bool]:
        if not self.has_mtp:
            return [False]
        return {"both": [True, False], "on": [True], "off": [False]}[getattr(self.args, "mtp", "both")]

    # ------------------------------------------------------------- rows
    def add(self, section: str, name: str, framework: str, timing=None, *, tokens: int = 0,
            model_flops: float = 0.0, mem=None, error: Optional[str] = None, **extra) -> dict:
        from dsv3.bench.timing import loadavg

        row: dict[str, Any] = {"section": section, "name": name, "framework": framework}
        row.update(extra)
        row["loadavg"] = loadavg()
        if timing is not None:
            row.update(timing.as_dict())
            if tokens:
                row["tokens"] = tokens
                row["tokens_per_s"] = tokens / timing.median_s
            if model_flops:
                row["model_flops"] = model_flops
                row["gflops"] = model_flops / timing.median_s / 1e9
                peak = self.peaks.get(framework_peak_key(framework, extra.get("dtype")))
                row["mfu"] = row["gflops"] / peak if peak else None
        if mem is not None:
            row.update(mem.as_dict())
        if error:
            row["error"] = error
        self.rows.append(row)
        msg = f"  [{section}] {name}: "
        if error:
            msg += "ERROR " + error.splitlines()[-1][:200]
        elif timing is not None:
            msg += f"median {timing.median_s * 1e3:.2f} ms (first {timing.first_s:.2f} s, iqr {timing.iqr_rel:.0%})"
            if tokens:
                msg += f", {row['tokens_per_s']:.0f} tok/s"
            if row.get("mfu") is not None:
                msg += f", {row['gflops']:.1f} GFLOP/s = {row['mfu']:.0%} of peak"
        self.log(msg)
        return row

    def guard(self, section: str, name: str, framework: str, fn: Callable[[], None], **extra) -> None:
        """Run one row's measurement; an exception becomes an error row, not a crash."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported in the results
            tb = traceback.format_exc(limit=4)
            self.add(section, name, framework, error=f"{type(e).__name__}: {e}\n{tb}", **extra)

    def train_flops(self, mtp: bool) -> float:
        return flops.train_flops_per_step(self.cfg, self.batch, self.seq, mtp=mtp and self.has_mtp)

    def floor_s(self, framework: str, mtp: bool, dtype: Optional[str] = None) -> Optional[float]:
        """The training step's matmul floor in this framework (HF: torch's) and dtype (None: the run's), or
        None when not measured."""
        f = self.floors.get(framework_peak_key(framework, dtype))
        return f["floor_s"].get("on" if mtp and self.has_mtp else "off") if f else None

    def forward_flops(self) -> float:
        return flops.forward_flops_per_step(self.cfg, self.batch, self.seq, mtp=False)


def framework_peak_key(framework: str, dtype: Optional[str] = None) -> str:
    """The key of a row's matmul peak and floor: its framework's ("hf" runs on torch), and for a row in
    another dtype than the run's (--bf16-rows) that dtype too ("torch bf16")."""
    return ("jax" if framework == "jax" else "torch") + (f" {dtype}" if dtype else "")


def backend_train_step(ctx: Ctx, framework: str, mtp: bool, compile_: bool = False, dtype: Optional[str] = None):
    """The training engineer's step (``dsv3_<framework>.train.make_backend``, what
    ``dsv3 train`` runs), on the bench's weights and batch.

    ``dtype`` ("fp32" | "bf16"): the step's dtype instead of the run's (--bf16-rows).
    Returns (step, description); ``step()`` runs one optimizer step (forward,
    backward, clip, AdamW, router-bias update) and returns the loss as a float
    (which also synchronises); ``step.last`` holds the backend's metrics of the
    latest step (main_loss, grad_norm, ...).
    """
    import importlib

    from dsv3.train_config import TrainConfig

    make_backend = importlib.import_module(f"dsv3_{framework}.train").make_backend
    kw = {"compile": compile_} if framework == "torch" else {}
    tcfg = TrainConfig(framework=framework, batch_size=ctx.batch, seq_len=ctx.seq, lr=LR, beta1=BETAS[0],
                       beta2=BETAS[1], weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                       # bf16: the backends' bf16 mode, bf16 compute with fp32 master weights
                       dtype="bfloat16" if (dtype or ctx.dtype) == "bf16" else "float32", progress=False,
                       plots=False, **kw)
    backend = make_backend(ctx.config(mtp), tcfg)
    backend.load_canonical_state(ctx.weights(mtp))
    desc = f"dsv3_{framework}.train.make_backend(...).train_step" + (" (compile=True)" if compile_ else "")
    batch = [(np.asarray(ctx.inputs, np.int32), np.asarray(ctx.labels, np.int32))]
    last = {}

    def step():
        out = backend.train_step(batch, LR)
        last.clear()
        last.update(out)
        return float(out["loss"])

    step.last = last
    return step, desc
