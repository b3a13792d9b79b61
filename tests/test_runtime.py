"""dsv3.runtime: the process settings the dsv3 command applies before the frameworks start."""

import os
import sys

import pytest

from dsv3 import runtime


def test_xla_flags_added_once_and_user_choice_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert runtime.configure_xla() == list(runtime.XLA_CPU_FLAGS)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=8" and flags[1:] == list(runtime.XLA_CPU_FLAGS)
    assert runtime.configure_xla() == []  # idempotent

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert runtime.configure_xla() == []
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_malloc_settings_applied_unless_user_set_malloc_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    assert runtime.configure_malloc() == runtime.MALLOC_SETTINGS
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert runtime.configure_malloc() == {}


def test_test_session_runs_with_the_command_settings():
    """The root conftest applied configure() before jax started (the suite tests what users run)."""
    applied = runtime.configure()
    for flag in runtime.XLA_CPU_FLAGS:
        assert flag.split("=")[0] in applied["XLA_FLAGS"]
