"""Timing, synchronisation and memory helpers for ``dsv3 bench``.

Every measurement: one first call timed on its own (compilation / first-call
cost), then ``warmup`` untimed calls, then ``reps`` timed calls, each followed
by the framework's synchronisation (``torch.cuda.synchronize`` on CUDA,
``jax.block_until_ready`` on every output). The steady-state figure is the
median; the spread is the inter-quartile range and min/max.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, asdict
from typing import Any, Callable, Optional


@dataclass
class Timing:
    first_s: float  # the very first call (includes tracing / compilation)
    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    max_s: float
    reps: int
    times_s: list = field(default_factory=list)
    warmup_s: list = field(default_factory=list)  # the untimed calls after the first

    @property
    def iqr_rel(self) -> float:
        return (self.p75_s - self.p25_s) / self.median_s if self.median_s else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["iqr_rel"] = self.iqr_rel
        return d


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def call_s(fn: Callable[[], Any], sync: Callable[[Any], None]) -> float:
    """Seconds of one call of ``fn``, synchronised."""
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], sync: Callable[[Any], None], *, warmup: int = 2, reps: int = 5) -> Timing:
    """Time ``fn`` (see module doc). The first call and the warm-up run with the garbage collector as the
    process has it (a first call that compiles allocates freely, and its cost is reported whole); the
    timed repetitions run with Python's cyclic collector off, as ``timeit`` does, so no collection pause
    lands inside one. (A full ``gc.collect()`` before each measurement did that job at 0.3 s or more a
    call once torch, JAX and transformers are loaded, more as the heap grows: the tiny torch bench of
    tests/test_bench.py took 22.4 s of CPU with it and 7.8 s without, in one process holding those three
    libraries.)"""
    first = call_s(fn, sync)
    warm = [call_s(fn, sync) for _ in range(warmup)]
    enabled = gc.isenabled()
    gc.disable()
    try:
        times = [call_s(fn, sync) for _ in range(reps)]
    finally:
        if enabled:
            gc.enable()
    return Timing(first_s=first, median_s=statistics.median(times), p25_s=quantile(times, 0.25),
                  p75_s=quantile(times, 0.75), min_s=min(times), max_s=max(times), reps=len(times),
                  times_s=times, warmup_s=warm)


# ------------------------------------------------------------------ sync
def torch_sync(device: str) -> Callable[[Any], None]:
    import torch

    if device.startswith("cuda"):
        return lambda _out: torch.cuda.synchronize()
    return lambda _out: None  # CPU eager and compiled torch return finished tensors


def jax_sync(_out: Any) -> None:
    import jax

    jax.block_until_ready(_out)


# ----------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory over a block of code.

    CPU: the process's resident-set high-water mark (``VmHWM``), reset first by
    writing ``5`` to ``/proc/self/clear_refs`` (Linux); reported as the peak and
    as the rise above the resident size at entry. Both frameworks' allocators
    keep freed memory, so this is an upper bound on what the work needed.
    CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry) or JAX's
    ``peak_bytes_in_use`` (not resettable: a running maximum).
    """

    def __init__(self, device: str = "cpu", framework: str = "torch"):
        self.device, self.framework = device, framework
        self.peak_bytes: Optional[int] = None
        self.delta_bytes: Optional[int] = None
        self.method = ""

    def __enter__(self):
        if self.device.startswith("cuda"):
            if self.framework in ("torch", "hf"):
                import torch

                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            else:
                self.base = _jax_gpu_mem("bytes_in_use")
        else:
            self.resettable = _reset_hwm()
            self.base = _proc_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            if self.framework in ("torch", "hf"):
                import torch

                self.peak_bytes = torch.cuda.max_memory_allocated()
                self.method = "torch.cuda.max_memory_allocated"
            else:
                self.peak_bytes = _jax_gpu_mem("peak_bytes_in_use")
                self.method = "jax peak_bytes_in_use (running max)"
        else:
            self.peak_bytes = _proc_status_kb("VmHWM") * 1024
            self.method = "VmHWM (reset)" if self.resettable else "VmHWM (process lifetime)"
        if self.peak_bytes is not None and self.base is not None:
            self.delta_bytes = max(0, self.peak_bytes - self.base)
        return False

    def as_dict(self) -> dict:
        return {"peak_mb": _mb(self.peak_bytes), "peak_delta_mb": _mb(self.delta_bytes), "mem_method": self.method}


def _mb(b):
    return None if b is None else round(b / 2**20, 1)


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _jax_gpu_mem(key: str) -> Optional[int]:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get(key)
    except Exception:  # noqa: BLE001 - backends without stats
        return None


# ---------------------------------------------------------- environment
def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str) -> dict:
    """Machine, thread and version facts stated next to every result."""
    env: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "loadavg_start": loadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "device": device,
    }
    return env


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
