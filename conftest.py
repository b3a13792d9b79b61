"""Settings every test session needs before jax is first imported (docs/reference.md §9, §11).

- ``--xla_allow_excess_precision=false``: XLA:CPU otherwise keeps fused bf16
  intermediates in fp32, which moves bf16 results away from torch's and HF's
  op-by-op rounding (the bf16 bit-parity tests rely on this).
- ``--xla_backend_optimization_level=0`` and ``--xla_cpu_use_fusion_emitters=false``: the suite compiles
  several hundred small programs and runs each a handful of times, so compiling is most of its JAX time.
  LLVM does not optimise the code XLA:CPU generates, and XLA's classic emitters generate it (the default
  MLIR fusion emitters emit code that only pays off after LLVM's optimisation). Measured on 2 cores: the
  2-layer tiny model's train step compiles in 8-11 CPU seconds at level 0 and in 4.4-6.4 with both flags
  (12.6 s with XLA's defaults); the whole suite took 8 min 42 s at level 0 and 6 min 55 s with both, one
  run after the other. What is computed stays the same programme, rounded differently: on the tiny
  training run the losses of these settings and of XLA's defaults differ in the last bit or two
  (7.224823951721191 vs 7.224823474884033 at step 1). Every check of the suite, the bit-exact ones
  (resume, checkpoints, sharded vs one device, each comparing two runs of one setting) included, passes
  at level 0 with either emitter. The ``dsv3`` command keeps XLA's defaults: at LLVM's default level the
  classic emitters compile slower (the peer-small train step: 29-31 s against 16-17 s) and run no
  faster; the JAX profile test (tests/test_bench.py) runs its training steps with those defaults.
- fp32 matmuls at full precision (docs/reference.md §9.2.7; a no-op on CPU, needed on GPU/TPU).
- ``dsv3.runtime.configure()`` (with jax imported, so JAX's synchronous CPU dispatch is set before any
  test computes) and ``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1``: the settings the ``dsv3`` command
  runs with.
- ``OMP_WAIT_POLICY=PASSIVE`` (before torch loads): idle OpenMP threads sleep rather than spin (see below).

This root conftest is loaded before any test module or sub-directory conftest,
so the order in which pytest collects files cannot change the numerics.
"""

import os
import shutil
import sys
import tempfile

assert "jax" not in sys.modules, "jax was imported before the root conftest could configure XLA"
for _flag in ("--xla_allow_excess_precision=false", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# torch's OpenMP threads sleep while they wait instead of spinning (libgomp's default, read when torch loads
# it). The suite runs two pytest workers and, at times, multi-process jobs on 2 cores, so a spinning idle
# thread takes its core from another process's work: the whole suite (-n 2) took 338 s and 341 s with
# PASSIVE against 372 s and 381 s without (four runs, one machine, the same tests). Idle threads only:
# nothing computed changes.
assert "torch" not in sys.modules, "torch was imported before the root conftest could set OMP_WAIT_POLICY"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# One XLA compilation cache for the whole test run: the two xdist workers and the subprocesses the tests
# start (CLI runs, the 8-device mesh job) compile many of the same programs; the second compile of a
# program is then a read from disk. A fresh directory per run (the controlling pytest process's pid),
# removed when the run ends; nothing is carried from one run to the next.
_cache_owner = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
XLA_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"dsv3-tests-xla-cache-{_cache_owner}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# torch.compile's kernels likewise go to a directory of this run (not the machine-wide /tmp/torchinductor_*
# left by earlier runs): every run compiles what it uses, as on a fresh machine.
TORCHINDUCTOR_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"dsv3-tests-inductor-cache-{_cache_owner}")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", TORCHINDUCTOR_CACHE_DIR)

import jax  # noqa: E402,F401  (imported before configure(): it sets JAX's CPU dispatch at once, before any test computes)

from dsv3 import runtime  # noqa: E402

runtime.configure()  # the XLA:CPU dot emitter and allocator settings the dsv3 command runs with
# ... and the huge pages for malloc it restarts with (glibc reads GLIBC_TUNABLES when a process starts): set
# here, before pytest-xdist starts its workers, every worker and every subprocess a test starts has them.
# This controlling process itself runs without (it runs the tests only without -n).
_hugepages = runtime.hugepage_env()
if _hugepages:
    os.environ["GLIBC_TUNABLES"] = _hugepages["GLIBC_TUNABLES"]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny models on one torch intra-op thread, restored afterwards.

    Their matmuls take microseconds; on a shared 2-core machine OpenMP's
    barrier between two threads costs milliseconds per op when the other core
    is busy (figures: docs/bench/README.md, "Measured choices in the code").
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run first (otherwise in collection order). Under ``-n 2`` the long tests then
    start at once, one per worker, and the short ones fill in around them, instead of one long test
    starting last and running alone while the other worker idles (pytest-xdist hands out work in this
    order; its xdist_group units, the largest first, go before single tests)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    """The run's compilation caches go with the run (removed by the controlling process)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(XLA_CACHE_DIR, ignore_errors=True)
        shutil.rmtree(TORCHINDUCTOR_CACHE_DIR, ignore_errors=True)
