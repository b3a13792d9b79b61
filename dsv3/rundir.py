"""The run directory (``dsv3 train --out``): its layout, checkpoints, resume state and metrics log.

    .lock                  advisory lock (fcntl.flock) of the run writing here; holds its pid
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

One run owns a directory at a time (`RunLock`): a second run on the same
directory is refused while the first holds the lock, so the clean-up of
leftover temporary directories can only ever remove a dead run's files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from typing import Callable, Optional

import numpy as np

from dsv3.fileio import atomic_write_bytes, atomic_write_text


class RunDirError(ValueError):
    """The run directory cannot be used as asked (held by another run, or holding a run already)."""


class DiskFullError(OSError):
    """No space left on the device while writing a checkpoint; the previous checkpoint is intact."""


# -------------------------------------------------------------- ownership
class RunLock:
    """``<out>/.lock``, held with ``fcntl.flock`` for the life of a run (released when the process dies).

    ``acquire`` fails at once with a `RunDirError` naming the holder's pid.
    The lock file itself is never deleted (deleting it would let two runs hold
    two different files).
    """

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, ".lock")
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.out, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.out!r} is in use by another run (pid {holder}, lock {self.path}); "
                              f"wait for it to finish or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_RUN_FILES = ("train_config.json", "metrics.jsonl", "latest", "loss.png", "expert_load.png")
_STEP_DIR = re.compile(r"^step_\d{6,}$")


def run_files(out: str) -> list[str]:
    """The entries of ``out`` that belong to a training run (sorted); empty when it holds none."""
    if not os.path.isdir(out):
        return []
    return sorted(d for d in os.listdir(out)
                  if d in _RUN_FILES or _STEP_DIR.match(d) or d.startswith((".tmp-step_", ".old-step_")))


def clear_run(out: str) -> list[str]:
    """Remove a previous run's files from ``out`` (other files are left alone); returns what was removed."""
    gone = run_files(out)
    for d in gone:
        p = os.path.join(out, d)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    remove_leftovers(out)
    return gone


def remove_leftovers(out: str) -> list[str]:
    """Remove what a killed run leaves behind: ``.tmp-step_*`` / ``.old-step_*`` directories and the
    temporary files of interrupted atomic writes of ``latest``, ``metrics.jsonl``... Only safe for the
    holder of the directory's `RunLock` (no other run can be writing them)."""
    gone = []
    if not os.path.isdir(out):
        return gone
    for d in os.listdir(out):
        p = os.path.join(out, d)
        if d.startswith((".tmp-step_", ".old-step_")) and os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(d)
        elif d.startswith(".tmp-") and d.endswith(_RUN_FILES) and os.path.isfile(p):
            os.unlink(p)
            gone.append(d)
    return gone


# ------------------------------------------------------------ checkpoints
def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints(out: str) -> list[str]:
    """Every checkpoint directory of a run, newest (highest step) first."""
    if not os.path.isdir(out):
        return []
    names = [d for d in os.listdir(out) if _STEP_DIR.match(d) and os.path.isdir(os.path.join(out, d))]
    return [os.path.join(out, d) for d in sorted(names, key=lambda d: int(d[5:]), reverse=True)]


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
    checkpoints beyond ``keep``, and any of a later step (an abandoned continuation), are removed
    afterwards. A full disk raises
    `DiskFullError` naming the directory, with the temporary directory removed
    and the previous checkpoint untouched.
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
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno != errno.ENOSPC:
            raise
        prev = latest_checkpoint(out)
        raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing checkpoint {name} into "
                            f"{os.path.abspath(out)!r}; nothing of it was kept, "
                            + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
                            + "; free some space, then continue with --resume") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Checkpoints of later steps than this one belong to a continuation that was abandoned (a resume fell
    # back past them: unreadable, or their weights gave a non-finite loss); this run replaces them.
    ckpts = [os.path.basename(d) for d in checkpoints(out)]
    for d in ckpts:
        if int(d[5:]) > step:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    ckpts = [d for d in ckpts if int(d[5:]) <= step]
    for d in ckpts[keep:] if keep > 0 else []:
        if d != name:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    remove_leftovers(out)  # of killed runs (only the lock holder writes here)
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
