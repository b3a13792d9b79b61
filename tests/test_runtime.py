"""dsv3.runtime: the process settings the dsv3 command applies before the frameworks start."""

import json
import os
import subprocess
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


def probe() -> dict:
    """What the running process actually does, not what configure() reports.

    - ``ynn_fusion``: XLA:CPU compiled a jitted dot into a YNNPACK fusion (the flag is missing or came
      too late: XLA reads XLA_FLAGS once, when its CPU backend starts).
    - ``mmapped_24MiB``: a fresh 24 MiB malloc was served by mmap (glibc's default 128 KiB threshold)
      rather than from the heap (the 32 MiB threshold set by mallopt). None off Linux.
    - ``thp_64MiB``: the kernel may back a 64 MiB malloc (above any mmap threshold, as XLA's per-execution
      buffer is) with transparent huge pages: ``THPeligible`` of its mapping in /proc/self/smaps.
    - ``jit_buffer_faults``: the minor page faults of a call of a jitted product whose 144 MiB result is a
      temporary (XLA's per-call buffer), the median of its 3rd to 10th calls: ~37,000 where each call maps
      that buffer afresh in 4 KiB pages, a few hundred where the main heap keeps it (while the heap grows,
      a call now and then still gets fresh pages: a small block freed in between can sit where the
      buffer was).
    """
    import jax
    import jax.numpy as jnp

    import dsv3_jax  # noqa: F401  (as every dsv3 JAX run imports it: it applies the dispatch setting)

    a = jnp.ones((64, 64), jnp.float32)
    hlo = jax.jit(lambda x, y: x @ y).lower(a, a).compile().as_text()
    out = {"ynn_fusion": "__ynn_fusion" in hlo, "mmapped_24MiB": None, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
           "jax_async_dispatch": bool(jax.config.values["jax_cpu_enable_async_dispatch"]),
           "jit_buffer_faults": _jit_buffer_faults()}
    if sys.platform == "linux":
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        before = libc.mallinfo2().hblks
        ptr = libc.malloc(24 << 20)
        out["mmapped_24MiB"] = int(libc.mallinfo2().hblks - before)
        libc.free(ptr)
        big = libc.malloc(64 << 20)
        out["thp_64MiB"] = _thp_eligible(big)
        libc.free(big)
    return out


def _jit_buffer_faults() -> int:
    import resource
    import statistics

    import jax
    import jax.numpy as jnp

    x = jnp.ones((6144, 16), jnp.float32)
    product_sum = jax.jit(lambda x: (jnp.sin(x) @ x.T).sum())  # the [6144, 6144] fp32 product: 144 MiB
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        product_sum(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return int(statistics.median(faults[2:]))


def _started_with(text: str) -> bool:
    """``text`` is in the environment this process started with (not one set since)."""
    with open("/proc/self/environ", "rb") as f:
        return text.encode() in f.read()


def _thp_eligible(address: int) -> int:
    """THPeligible (0 or 1) of the mapping holding ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "THPeligible:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _subprocess_probe(code: str) -> dict:
    """probe() in a fresh interpreter whose environment has none of the settings, after ``code``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_test_session_runs_with_the_command_settings():
    """The root conftest applied the settings before jax started: this process compiles and allocates
    as the dsv3 command does (the suite tests what users run)."""
    got = probe()
    for flag in runtime.XLA_CPU_FLAGS:
        assert flag in got["XLA_FLAGS"].split()
    assert not got["ynn_fusion"], "XLA:CPU still emits YNNPACK dot fusions in this test session"
    if sys.platform == "linux" and not runtime._user_malloc_settings(os.environ):
        assert got["mmapped_24MiB"] == 0, "glibc malloc still mmaps 24 MiB blocks in this test session"
        assert not got["jax_async_dispatch"], "JAX still dispatches CPU calls asynchronously in this test session"
    if sys.platform == "linux" and _started_with(runtime.HUGEPAGE_TUNABLE):  # xdist workers (root conftest)
        assert got["thp_64MiB"] == 1, got


def test_dsv3_command_runs_with_the_settings_and_the_probe_sees_their_absence():
    """A subprocess runs the real ``dsv3`` entry point (dsv3.cli.main, from the command line: it restarts
    itself once with huge pages for malloc) with its ``info`` command replaced by the probe: main() applied
    every setting. The same probe in a bare interpreter sees them missing, so no check above can pass
    without the settings."""
    command = _subprocess_probe(
        "import json, sys\n"
        "import dsv3.cli as cli\n"
        "from test_runtime import probe\n"
        "cli.cmd_info = lambda args: print(json.dumps(probe())) or 0\n"
        "sys.argv = ['dsv3', 'info', '--preset', 'tiny']\n"
        "sys.exit(cli.main())\n")
    bare = _subprocess_probe("import json\nfrom test_runtime import probe\nprint(json.dumps(probe()))\n")
    assert not command["ynn_fusion"] and bare["ynn_fusion"]
    if sys.platform == "linux":
        assert command["mmapped_24MiB"] == 0 and bare["mmapped_24MiB"] == 1
        assert not command["jax_async_dispatch"] and bare["jax_async_dispatch"]
    if runtime.hugepage_env({}) is not None:  # glibc, and the kernel gives huge pages on request
        assert command["thp_64MiB"] == 1, command
        if runtime.thp_mode() == "madvise":
            assert bare["thp_64MiB"] == 0, bare


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_configured_process_keeps_xla_per_call_buffer():
    """Without huge pages (so each fresh page is one fault): after ``configure()`` a jitted call's 144 MiB
    temporary comes from the main heap, which keeps it, so the call faults in a few pages, not 36,864;
    a bare interpreter maps it afresh on every call (unless the kernel backs every mapping with huge
    pages, THP mode ``always``)."""
    configured = _subprocess_probe("import json\nfrom dsv3 import runtime\nruntime.configure()\n"
                                   "from test_runtime import probe\nprint(json.dumps(probe()))\n")
    assert not configured["jax_async_dispatch"]
    assert configured["jit_buffer_faults"] < 2000, configured
    if runtime.thp_mode() != "always":
        bare = _subprocess_probe("import json\nfrom test_runtime import probe\nprint(json.dumps(probe()))\n")
        assert bare["jax_async_dispatch"] and bare["jit_buffer_faults"] > 30000, bare


def test_jax_dispatch_follows_the_malloc_settings(monkeypatch):
    import jax

    flag = runtime.JAX_DISPATCH_FLAG
    monkeypatch.setattr(jax.config, "update", lambda name, value: seen.append((name, value)))
    seen = []
    monkeypatch.setattr(runtime, "_applied", {"malloc": {}, "jax_sync_dispatch": False})  # user malloc settings
    assert runtime.configure_jax_dispatch() is False and seen == []
    monkeypatch.setattr(runtime, "_applied", {"malloc": dict(runtime.MALLOC_SETTINGS), "jax_sync_dispatch": True})
    assert runtime.configure_jax_dispatch() is True and seen == [(flag, False)]
    monkeypatch.delitem(sys.modules, "jax")  # not imported yet: dsv3_jax sets it on import
    assert runtime.configure_jax_dispatch() is False and seen == [(flag, False)]


def test_hugepage_env_adds_the_tunable_once_and_respects_the_user(monkeypatch):
    monkeypatch.setattr(runtime, "thp_on_request", lambda: True)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    env = runtime.hugepage_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": runtime.HUGEPAGE_TUNABLE}
    assert runtime.hugepage_env(env) is None  # the restarted process: already set
    other = runtime.hugepage_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})
    assert other["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX2:" + runtime.HUGEPAGE_TUNABLE
    for user in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                 {"MALLOC_ARENA_MAX": "2"}):
        assert runtime.hugepage_env(user) is None, user
    monkeypatch.setattr(runtime, "thp_on_request", lambda: False)
    assert runtime.hugepage_env({}) is None
    monkeypatch.setattr(runtime, "thp_on_request", lambda: True)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert runtime.hugepage_env({}) is None


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_our_hugepage_tunable_alone_keeps_the_malloc_settings(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.HUGEPAGE_TUNABLE)
    assert runtime.configure_malloc() == runtime.MALLOC_SETTINGS
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.HUGEPAGE_TUNABLE + ":glibc.malloc.top_pad=0")
    assert runtime.configure_malloc() == {}


@pytest.mark.parametrize("flags,want", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                        ("fpu avx2 avx512f avx512_vnni", False), (None, None)])
def test_cpu_has_bf16_reads_the_cpuinfo_flags(tmp_path, flags, want):
    """AVX-512 BF16 or AMX-BF16 in the first processor's flags: bf16 arithmetic in hardware; no flags line
    (another architecture's cpuinfo) or no file at all: unknown."""
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n" + (f"flags\t\t: {flags}\n" if flags else "")
                 + "\nprocessor\t: 1\nflags\t\t: avx512_bf16\n")
    assert runtime.cpu_has_bf16(str(p)) is want
    assert runtime.cpu_has_bf16(str(tmp_path / "missing")) is None
