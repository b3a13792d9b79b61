"""parity/: dsv3_torch and dsv3_jax hold the same weights and must compute the same thing.

XLA's numerics are pinned in the root conftest.py, before jax is imported. Here torch runs on
one intra-op thread (tiny ops; OpenMP barriers on a busy 2-core box are slower).

At the end of a run, ``pytest_terminal_summary`` prints the largest error seen per component and
dtype (each test calls ``parity_util.record``), so ``pytest parity/`` shows how close the two are.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import parity_util  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every parity test on one torch thread (the root conftest's fixture)."""


def pytest_configure(config):
    """One JSON-lines file of records per run, so pytest-xdist workers' errors reach the summary."""
    if not hasattr(config, "workerinput") and not os.environ.get("DSV3_PARITY_RESULTS"):
        fd, path = tempfile.mkstemp(prefix="dsv3-parity-", suffix=".jsonl")
        os.close(fd)
        os.environ["DSV3_PARITY_RESULTS"] = path  # inherited by xdist workers, started after configure
        parity_util.set_results_file(path)
        config._dsv3_parity_file = path


def pytest_unconfigure(config):
    path = getattr(config, "_dsv3_parity_file", None)
    if path and os.path.exists(path):
        os.unlink(path)
        os.environ.pop("DSV3_PARITY_RESULTS", None)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = parity_util.summary_rows()
    if not rows:
        return
    tr = terminalreporter
    tr.section("parity: max error per component (torch vs jax)")
    tr.write_line(f"{'component':<40}{'dtype':<10}{'max error':>12}{'tolerance':>12}{'checks':>8}  metric")
    for comp, dtype, err, tol, n, metric in rows:
        flag = "" if err <= tol else "  <-- over tolerance"
        tr.write_line(f"{comp:<40}{dtype:<10}{err:>12.3e}{tol:>12.1e}{n:>8}  {metric}{flag}")
