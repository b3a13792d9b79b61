"""The run directory (``dsv3 train --out``): its layout, checkpoints, resume state and metrics log.

    train_config.json      the TrainConfig of the run
    metrics.jsonl          one JSON object per step ("train") and per evaluation ("eval")
    loss.png               train / validation loss, main and MTP (`dsv3.plots`)
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

import json
import os
import shutil
from typing import Callable, Optional

import numpy as np

from dsv3.fileio import atomic_write_bytes, atomic_write_text


# ------------------------------------------------------------ checkpoints
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


# ------------------------------------------------------------------ metrics
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
