"""Process settings for CPU runs, applied by the ``dsv3`` command (and the test
session) before any framework allocates or compiles.

Each was found by profiling ``dsv3 bench`` on the peer-small shape (2-core
CPU, fp32); the measured effects are in ``docs/bench/README.md``.

* **glibc malloc keeps freed memory** (``mallopt``): by default blocks above
  a dynamic threshold come from ``mmap`` and go back to the OS when freed, so
  a step's multi-MB temporaries can be fresh pages, faulted in 4 KiB at a
  time. The main heap serves blocks of any size (``M_MMAP_MAX`` 0) and is
  never trimmed; other threads' arenas serve blocks up to their 64 MiB heaps
  and map larger ones.
* **Transparent huge pages for malloc** (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``,
  ``restart_with_hugepages``): glibc then asks the kernel for 2 MiB pages
  (``madvise(MADV_HUGEPAGE)``) for the memory it maps, 512 times fewer page
  faults for fresh memory. glibc reads its tunables only when a process
  starts, so the ``dsv3`` command re-executes itself once with the tunable
  added (same interpreter, arguments and process id) where the kernel offers
  transparent huge pages on request.
* **JAX dispatches single-device CPU calls synchronously**
  (``jax_cpu_enable_async_dispatch`` off, with the malloc settings only; set
  when ``dsv3_jax`` is imported, ``configure_jax_dispatch``):
  XLA:CPU allocates one buffer for a jitted call's temporaries each time it
  runs (354 MiB for the peer-small training step) and frees it after. Run
  asynchronously, the call allocates it on an XLA worker thread, whose arena
  maps it afresh every call: the kernel zeroes 354 MiB a step, 40-70 ms of
  system time. Run on the calling (main) thread, it comes from the main heap,
  which keeps it: the step's page faults go from ~570 to ~0 and its system
  time to ~10 ms (docs/bench/README.md, "Process settings"). Calls on several
  devices run on XLA's threads either way.
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
import platform
import sys
from typing import Optional

XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)

MALLOC_SETTINGS = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30, "top_pad": 64 << 20, "mmap_max": 0}
_MALLOPT = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3, "mmap_max": -4}  # M_* in glibc's malloc.h
# Turned off, it puts XLA:CPU's per-call buffer on the main heap (module docstring); with MALLOC_SETTINGS
# only, since without them the main heap would map the buffer afresh each call as well.
JAX_DISPATCH_FLAG = "jax_cpu_enable_async_dispatch"
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

_applied: dict = {}


CPUINFO = "/proc/cpuinfo"


def cpu_info(path: str = CPUINFO) -> dict:
    """The first processor's fields of /proc/cpuinfo (vendor_id, cpu family, flags, ...); {} where there is none."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {}
    return fields


def cpu_has_bf16(path: str = CPUINFO) -> Optional[bool]:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX-BF16 in its flags); None where
    /proc/cpuinfo lists no flags (another OS, another architecture)."""
    flags = cpu_info(path).get("flags")
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def configure_xla() -> list[str]:
    """Add XLA_CPU_FLAGS to XLA_FLAGS (each unless the user set that flag).

    XLA reads XLA_FLAGS when its CPU backend starts, so call this before the
    first jax computation; returns the flags added."""
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f for f in XLA_CPU_FLAGS if f.split("=")[0] not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added


def _user_malloc_settings(environ) -> bool:
    """The user chose malloc settings: MALLOC_* variables, or glibc.malloc tunables other than our hugetlb one."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    return (any(k.startswith("MALLOC_") for k in environ)
            or any(not t.startswith("glibc.malloc.hugetlb") for t in tunables))


def configure_malloc() -> dict:
    """glibc: the main heap serves blocks of any size and is never trimmed; blocks up to 32 MiB stay on
    the threads' heaps too.

    Skipped (returns {}) off glibc or when the user set MALLOC_* or malloc tunables (the hugetlb tunable
    alone does not count: it is what ``restart_with_hugepages`` adds)."""
    if sys.platform != "linux" or _user_malloc_settings(os.environ):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    ok = all(mallopt(_MALLOPT[k], v) == 1 for k, v in MALLOC_SETTINGS.items())
    return dict(MALLOC_SETTINGS) if ok else {}


def configure_jax_dispatch() -> bool:
    """Where ``configure()`` applied the malloc settings in this process: JAX runs single-device CPU calls
    on the calling thread (``JAX_DISPATCH_FLAG`` off; module docstring). JAX reads the flag when its CPU
    backend starts; ``dsv3_jax`` calls this when it is imported, ``configure()`` where jax is imported
    already, so runs that never import jax do not pay for importing it. Returns whether the flag was set."""
    if not _applied.get("jax_sync_dispatch") or "jax" not in sys.modules:
        return False
    sys.modules["jax"].config.update(JAX_DISPATCH_FLAG, False)
    return True


def thp_mode() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``; "unavailable" without one)."""
    try:
        with open(THP_MODE_FILE) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def thp_on_request() -> bool:
    """The kernel gives transparent huge pages to memory that asks for them (mode ``always`` or ``madvise``)."""
    return thp_mode() in ("always", "madvise")


def hugepage_env(environ=None) -> Optional[dict]:
    """A copy of the environment with ``HUGEPAGE_TUNABLE`` added to GLIBC_TUNABLES, or None where it does
    not apply: not Linux with glibc, no transparent huge pages on request, the tunable already set (by the
    user or by an earlier restart), or the user chose malloc settings (MALLOC_*, glibc.malloc tunables)."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "glibc.malloc.hugetlb" in tunables
            or _user_malloc_settings(env) or not thp_on_request()):
        return None
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGEPAGE_TUNABLE) if t)
    return env


def restart_with_hugepages() -> None:
    """Re-execute this process with ``hugepage_env`` (same interpreter, arguments and process id; at most
    once: the restarted process finds the tunable set). Returns only where it does not apply or exec fails.

    Call it first thing in a program's entry point, before it starts threads or does work."""
    env = hugepage_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:
        pass


def configure() -> dict:
    """The XLA flags, malloc settings and (with them) JAX's synchronous CPU dispatch, once per process;
    returns what is in effect (for reports), with GLIBC_TUNABLES (huge pages come from
    ``restart_with_hugepages``, at process start)."""
    if not _applied:
        _applied["xla_flags_added"] = configure_xla()
        _applied["malloc"] = configure_malloc()
        _applied["jax_sync_dispatch"] = bool(_applied["malloc"])
        configure_jax_dispatch()
        _applied["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
        _applied["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return dict(_applied)
