"""Process settings for CPU runs, applied by the ``dsv3`` command (and the test
session) before any framework allocates or compiles.

Both were found by profiling ``dsv3 bench`` on the peer-small shape (2-core
CPU, fp32); the measured effects are in ``docs/bench/README.md``.

* **glibc malloc keeps freed memory** (``mallopt``): by default blocks above
  a dynamic threshold come from ``mmap`` and go back to the OS when freed, so
  a step's multi-MB temporaries can be fresh pages, faulted in 4 KiB at a
  time. Blocks up to 32 MiB (the largest threshold glibc allows) are kept on
  a heap that is never trimmed. (XLA's own preallocated buffer of a whole
  step is larger than 32 MiB and is still mapped per call.)
* **XLA:CPU without the YNNPACK dot fusions**
  (``--xla_cpu_experimental_ynn_fusion_type=``): jaxlib 0.10 routes dots
  through YNNPACK; XLA's own dot emitters run this model's steps faster.
  The price: a row's product rounds by its position in the matmul, so in the
  grouped (dropless) MoE a token's output can move by an ulp when OTHER
  tokens' routing moves its row (torch's per-expert matmuls behave the same
  way; the causality tests allow for it).

Nothing here changes a result beyond floating-point rounding of matmuls
(tests run with the same settings), and every setting the user already chose
is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30, "top_pad": 64 << 20}

_applied: dict = {}


def configure_xla() -> list[str]:
    """Add XLA_CPU_FLAGS to XLA_FLAGS (each unless the user set that flag).

    XLA reads XLA_FLAGS when its CPU backend starts, so call this before the
    first jax computation; returns the flags added."""
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f for f in XLA_CPU_FLAGS if f.split("=")[0] not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added


def configure_malloc() -> dict:
    """glibc: keep freed blocks up to 32 MiB on the heap and never trim it.

    Skipped (returns {}) off glibc or when the user set MALLOC_* or malloc tunables."""
    if (sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ)
            or "malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MALLOC_SETTINGS["mmap_threshold"]),
                                              (_M_TRIM_THRESHOLD, MALLOC_SETTINGS["trim_threshold"]),
                                              (_M_TOP_PAD, MALLOC_SETTINGS["top_pad"])))
    return dict(MALLOC_SETTINGS) if ok else {}


def configure() -> dict:
    """Both settings, once per process; returns what is in effect (for reports)."""
    if not _applied:
        _applied["xla_flags_added"] = configure_xla()
        _applied["malloc"] = configure_malloc()
        _applied["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return dict(_applied)
