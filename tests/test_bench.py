"""`dsv3 bench` end to end on tiny models (no timing assertions): torch and HF on the tiny preset
(``--preset``), JAX on the tiny preset cut to two layers (``--config``: one dense and one MoE layer plus
the MTP block, every block kind, at a smaller compile)."""

import json
import math
import os

import numpy as np
import pytest

from dsv3 import ModelConfig, flops

# tiny with num_hidden_layers=2: the JAX tests compile every program of a 2-layer model, not 3
TINY2 = ModelConfig.preset("tiny").replace(num_hidden_layers=2)
QUICK = ["--quick", "--batch", "2", "--seq", "16", "--reps", "2", "--warmup", "0",
         "--decode-reps", "2", "--contexts", "16,1024", "--spec-batches", "2", "--spec-new", "3",
         "--long-prompt", "40", "--long-new", "3"]


@pytest.fixture(scope="module")
def tiny2_json(tmp_path_factory):
    """TINY2 as a HF-style config file, named tiny2.json (the bench names the run after it)."""
    path = tmp_path_factory.mktemp("cfg") / "tiny2.json"
    path.write_text(json.dumps(TINY2.to_hf_dict()))
    return str(path)


def _run(tmp_path, *extra):
    from dsv3.bench import main

    out = tmp_path / "bench"
    assert main(QUICK + ["--out", str(out), *extra]) == 0
    res = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    png = (out / "bench.png").read_bytes()
    return res, md, png


def _check_common(res, md, png, contexts=(16, 248), name="tiny", cfg=ModelConfig.preset("tiny")):
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert res["meta"]["config_name"] == name and res["meta"]["torch_threads"] >= 1
    assert ModelConfig.from_hf_dict(res["meta"]["config"]) == cfg
    assert res["meta"]["env"]["cpu_count"] >= 1 and res["meta"]["loadavg_end"] is not None
    # tiny has max_position_embeddings 256: 1024 is clipped to 256 - 8 to fit context + decode steps.
    assert res["meta"]["contexts"] == list(contexts)
    assert res["flops"]["train_flops_per_step_mtp"] == pytest.approx(flops.train_flops_per_step(cfg, 2, 16, True))
    for t in res["targets"]:
        assert t["status"] in ("pass", "miss", "n/a")
    assert "### Targets" in md and "### KV cache per token per layer" in md
    for r in res["rows"]:
        if "error" in r:
            continue
        assert r["median_s"] > 0 and r["p25_s"] <= r["median_s"] <= r["p75_s"] and r["first_s"] > 0
        assert len(r["times_s"]) == r["reps"] >= 2


def _check_speculative(res, md, framework):
    """Plain vs MTP speculative decoding rows (batch 2, greedy and T 0.8): greedy gave plain greedy's tokens."""
    rows = {r["mode"]: r for r in _ok(res, "speculative", framework)}
    assert set(rows) == {"greedy", "T0.8"} and all(r["batch"] == 2 for r in rows.values())
    assert rows["greedy"]["same_tokens_as_plain"] is True
    for r in rows.values():
        assert 0 <= r["acceptance_rate"] <= 1 and 1 <= r["mean_accepted_length"] <= 2
        assert r["speedup"] == pytest.approx(r["plain_median_s"] / r["median_s"]) and r["tokens"] == 2 * 3
    assert f"| {framework} b2 greedy |" in md


def _check_long(res, md, framework):
    """The long-prompt row: 3 tokens after a 40-token prompt, end to end."""
    (r,) = _ok(res, "long", framework)
    assert r["prompt_tokens"] == 40 and r["new_tokens"] == 3 and len(r["out_tokens"]) == 3
    assert "### Long prompt, end to end" in md and f"| {r['name']} | 40 | 3 |" in md
    return r


def _check_floor(res, md, framework, cfg, train):
    """Every distinct matmul of the step (MTP on and off) timed once; each train row against its floor."""
    f = res["floors"][framework]
    kernels = "in_out" if framework == "jax" else "out_in"
    shapes = {m.shape for mtp in (True, False) for m in flops.step_matmuls(cfg, 2, 16, mtp=mtp, kernels=kernels)}
    assert {(e["b"], e["m"], e["k"], e["n"], e["layout"]) for e in f["matmuls"]} == shapes
    for e in f["matmuls"]:
        assert e["net_s"] == max(0, e["median_s"] - f["call_overhead_s"])
    for key, mtp in (("on", True), ("off", False)):
        counts = {m.shape: m.count for m in flops.step_matmuls(cfg, 2, 16, mtp=mtp, kernels=kernels)}
        want = sum(counts.get((e["b"], e["m"], e["k"], e["n"], e["layout"]), 0)
                   * max(0, e["median_s"] - f["call_overhead_s"]) for e in f["matmuls"])
        assert f["floor_s"][key] == pytest.approx(want) and f["call_overhead_s"] > 0
    for r in train:
        assert r["floor_s"] == f["floor_s"]["on" if r["mtp"] else "off"]
        assert r["vs_floor"] == pytest.approx(r["median_s"] / r["floor_s"])
    assert "### Matmul floor of the training step" in md


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_adapter_matmul_layouts(framework):
    """The floor's products in each stored layout give C[b, M, N] (M, K, N distinct, so a wrong transpose
    cannot pass) and equal the product of the operands as numpy computes it."""
    from types import SimpleNamespace

    from dsv3.bench.rows import operand_shapes

    ctx = SimpleNamespace(device="cpu", dtype="fp32")
    if framework == "torch":
        from dsv3.bench.rows_torch import TorchAdapter as A
    else:
        from dsv3.bench.rows_jax import JaxAdapter as A
    ad = A(ctx)
    for b in (1, 3):
        for layout in ("nn", "nt", "tn"):
            call = ad.matmul(b, 5, 7, 11, layout)
            a, w = (np.asarray(v, np.float64) for v in call.operands)
            assert (a.shape, w.shape) == operand_shapes(b, 5, 7, 11, layout)
            x, y = (np.swapaxes(a, -1, -2) if layout == "tn" else a), (np.swapaxes(w, -1, -2) if layout == "nt" else w)
            out = np.asarray(call())  # JAX's: the last of the products its loop repeats
            assert out.shape == ((b,) if b > 1 else ()) + (5, 11)
            np.testing.assert_allclose(out, x @ y, rtol=1e-5, atol=1e-5)
            assert getattr(call, "products", 1) == (64 if framework == "jax" else 1)
    if framework == "jax":  # repeats sized to ~2e8 multiply-adds a call, 4 to 64
        assert ad.matmul(1, 2048, 2048, 2048, "nn").products == 4
        assert ad.matmul(1, 512, 256, 128, "nt").products == 12


def test_floor_time_is_per_product(monkeypatch):
    """A call that repeats its product n times (JAX's) is timed whole; every figure is divided by n."""
    from dsv3.bench import peak
    from dsv3.bench.timing import Timing

    whole = Timing(first_s=8.0, median_s=4.0, p25_s=2.0, p75_s=6.0, min_s=1.0, max_s=9.0, reps=3,
                   times_s=[1.0, 4.0, 9.0], warmup_s=[8.0])
    monkeypatch.setattr(peak, "measure", lambda fn, sync, warmup, reps: whole)

    def fn():
        return None

    assert peak._time(fn, lambda _: None, 0.01) == whole
    fn.products = 4
    t = peak._time(fn, lambda _: None, 0.01)
    assert (t.first_s, t.median_s, t.p25_s, t.p75_s, t.min_s, t.max_s) == (2.0, 1.0, 0.5, 1.5, 0.25, 2.25)
    assert t.times_s == [0.25, 1.0, 2.25] and t.warmup_s == [2.0] and t.reps == 3 and t.iqr_rel == whole.iqr_rel


def _ok(res, section, framework):
    rows = [r for r in res["rows"] if r["section"] == section and r["framework"] == framework]
    errors = [r["error"] for r in rows if "error" in r]
    assert rows and not errors, errors
    return rows


@pytest.mark.slow
def test_bench_torch_and_hf_end_to_end(tmp_path, one_torch_thread):
    res, md, png = _run(tmp_path, "--preset", "tiny", "--frameworks", "torch", "--skip", "compile")
    _check_common(res, md, png)
    train = _ok(res, "train", "torch")
    assert {r["mtp"] for r in train} == {True, False}
    assert all(math.isfinite(r["loss_first"]) and r["mfu"] > 0 for r in train)
    _ok(res, "prefill", "torch")
    _ok(res, "moe", "torch")
    _check_speculative(res, md, "torch")
    dec = _ok(res, "decode", "torch")
    assert {(r["kind"], r["context"]) for r in dec} == {(k, n) for k in ("latent", "naive") for n in (16, 248)}
    cfg = ModelConfig.preset("tiny")
    lat = [r for r in dec if r["kind"] == "latent"][0]
    assert lat["cache_values_per_token_per_layer"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert "torch" in res["peaks"] and res["peaks"]["torch"]["peak_gflops"] > 0
    _check_floor(res, md, "torch", ModelConfig.preset("tiny"), train + _ok(res, "train", "hf"))
    hf = _ok(res, "train", "hf")
    # Same weights and batch: HF's loss equals our main loss (fp32).
    ours = [r for r in train if not r["mtp"]][0]
    assert hf[0]["loss_first"] == pytest.approx(ours["main_loss_first"], abs=1e-4)
    assert "| HF eager-attn eager-experts |" in md
    # the long prompt: transformers' generate on the same weights gives the same greedy tokens
    assert _check_long(res, md, "torch")["out_tokens"] == _check_long(res, md, "hf")["out_tokens"]


@pytest.mark.slow
def test_bench_jax_end_to_end(tmp_path, tiny2_json):
    # --config: the 2-layer tiny (the config path of the command line; the torch test takes --preset).
    # --prefill-chunk 1: the prompt is filled one token at a time, by the same compiled one-token step
    # that is then timed (one decode program per cache kind instead of two)
    # --bf16-rows here rather than in the torch test: torch's bf16 matmuls crawl on CPUs without bf16
    # instructions, XLA's do not. No floor here (a compile per product; the torch test measures one with the
    # same code, test_adapter_matmul_layouts checks JAX's products)
    res, md, png = _run(tmp_path, "--config", tiny2_json, "--frameworks", "jax", "--skip", "hf,peak,floor",
                        "--mtp", "on", "--contexts", "16", "--prefill-chunk", "1", "--bf16-rows")
    cfg = TINY2
    _check_common(res, md, png, contexts=(16,), name="tiny2", cfg=cfg)
    train = [r for r in _ok(res, "train", "jax") if "dtype" not in r]
    assert [r["mtp"] for r in train] == [True] and res["floors"] == {} and train[0]["floor_s"] is None
    # --bf16-rows: the step in bf16, MTP off
    (bf16,) = [r for r in _ok(res, "train", "jax") if r.get("dtype") == "bf16"]
    assert bf16["name"] == "jax jit bf16" and not bf16["mtp"] and math.isfinite(bf16["loss_first"])
    assert "jax jit bf16 step >= 1.5x its fp32 step (MTP off)" in md
    _ok(res, "prefill", "jax")
    _ok(res, "moe", "jax")
    _check_speculative(res, md, "jax")
    dec = _ok(res, "decode", "jax")
    lat = [r for r in dec if r["kind"] == "latent"][0]
    assert lat["cache_values_per_token_per_layer"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    nai = [r for r in dec if r["kind"] == "naive"][0]
    assert nai["cache_values_per_token_per_layer"] == cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    _check_long(res, md, "jax")


def _row(section, name, framework, median, **kw):
    return {"section": section, "name": name, "framework": framework, "median_s": median, "p25_s": median,
            "p75_s": median, "first_s": 1.0, "iqr_rel": 0.0, "tokens": 100, "tokens_per_s": 100 / median,
            "reps": 3, "times_s": [median] * 3, **kw}


def test_targets_and_markdown_from_synthetic_results(tmp_path):
    from dsv3.bench import report

    cfg = ModelConfig.preset("small")
    rows = [
        _row("train", "torch eager +MTP", "torch", 1.2, mtp=True, variant="eager", mfu=0.5, gflops=90.0),
        _row("train", "torch eager", "torch", 1.0, mtp=False, variant="eager", mfu=0.5, gflops=90.0,
             floor_s=0.5, vs_floor=2.0),
        _row("train", "jax jit +MTP", "jax", 1.25, mtp=True, variant="jit", mfu=0.75, gflops=150.0),
        _row("train", "jax jit", "jax", 0.9, mtp=False, variant="jit", mfu=0.8, gflops=160.0,
             floor_s=0.75, vs_floor=1.2),
        _row("train", "HF eager-experts", "hf", 1.1, mtp=False, variant="eager"),
        _row("train", "HF grouped_mm-experts", "hf", 1.3, mtp=False, variant="grouped_mm"),
        _row("train", "torch eager bf16", "torch", 0.5, mtp=False, variant="eager", dtype="bf16", mfu=0.9),
        _row("train", "torch compile bf16", "torch", 0.7, mtp=False, variant="compile", dtype="bf16", mfu=0.9),
        _row("decode", "torch latent @1024", "torch", 0.01, kind="latent", context=1024,
             cache_values_per_token_per_layer=80.0, cache_bytes_per_token_per_layer=320.0),
        _row("decode", "torch naive @1024", "torch", 0.02, kind="naive", context=1024,
             cache_values_per_token_per_layer=640.0, cache_bytes_per_token_per_layer=2560.0),
        _row("moe", "torch moe forward", "torch", 1.4, kind="moe", phase="forward", gflops=1.0),
        _row("moe", "torch dense forward", "torch", 1.0, kind="dense", phase="forward", gflops=1.0),
        {"section": "moe", "name": "jax", "framework": "jax", "error": "RuntimeError: boom\ntraceback"},
        _row("speculative", "torch b1 greedy", "torch", 0.5, batch=1, mode="greedy", speedup=0.8,
             plain_tokens_per_s=160.0, acceptance_rate=0.5, mean_accepted_length=1.5, verify_calls=40,
             same_tokens_as_plain=True),
        _row("speculative", "jax b1 greedy", "jax", 0.5, batch=1, mode="greedy", speedup=1.3,
             plain_tokens_per_s=154.0, acceptance_rate=0.85, mean_accepted_length=1.85, verify_calls=30,
             same_tokens_as_plain=False),
    ]
    res = {"meta": {"config_name": "small", "is_peer_small_shape": True, "device": "cpu", "dtype": "fp32",
                    "batch": 8, "seq": 256, "quick": False, "contexts": [1024], "decode_batch": 8,
                    "decode_steps": 8, "mtp_depths": 1, "layers": 4, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
                    "extra_dtypes": ["bf16"],
                    "env": {"loadavg_start": [1.0, 1.0, 1.0]}, "versions": {}, "torch_threads": 2},
           "flops": flops.summary(cfg, 256, 8), "peaks": {}, "rows": rows}
    t = {x["target"]: x for x in report.evaluate_targets(res)}
    # against the fastest HF row (eager experts, 1.1 s)
    assert t["torch train step >= 1.25x HF (MTP off both)"]["value"] == pytest.approx(1.1, abs=1e-3)
    assert t["torch train step >= 1.25x HF (MTP off both)"]["status"] == "miss"
    assert t["JAX jit >= fastest torch (MTP on)"]["value"] == pytest.approx(1.2 / 1.25, abs=1e-3)
    assert t["JAX jit >= fastest torch (MTP on)"]["status"] == "miss"
    assert t["JAX jit >= fastest torch (MTP off)"]["value"] == pytest.approx(1.0 / 0.9, abs=1e-3)
    assert t["JAX jit >= fastest torch (MTP off)"]["status"] == "pass"
    assert t["fastest train step >= 60% of matmul peak (MFU)"]["status"] == "pass"  # jax 0.8
    assert t["torch: fastest train step <= 1.3x its matmul floor"]["value"] == 2.0
    assert t["torch: fastest train step <= 1.3x its matmul floor"]["status"] == "miss"
    assert t["jax: fastest train step <= 1.3x its matmul floor"]["status"] == "pass"
    # the bf16 row is compared with its fp32 step only (not the fastest torch row, nor the MFU target)
    assert t["torch eager bf16 step >= 1.5x its fp32 step (MTP off)"]["value"] == 2.0
    assert t["torch eager bf16 step >= 1.5x its fp32 step (MTP off)"]["status"] == "pass"
    assert "jax jit bf16 step >= 1.5x its fp32 step (MTP off)" in t  # n/a: no JAX bf16 row
    # a compiled bf16 row without its fp32 step: n/a (a run with neither would leave the target out)
    assert t["torch compile bf16 step >= 1.5x its fp32 step (MTP off)"]["status"] == "n/a"
    assert t["torch: absorbed decoding beats naive from 1024 up"]["status"] == "pass"
    assert t["torch: latent cache = C + R values/token/layer"]["status"] == "pass"
    assert t["torch: MoE layer forward <= 1.3x dense"]["status"] == "miss"  # 1.4
    share = res["flops"]["mtp_flop_share"]
    assert t["torch eager: MTP time share <= FLOP share"]["status"] == ("pass" if 1.2 <= share else "miss")
    assert t["jax jit: MTP time share <= FLOP share"]["status"] == ("pass" if 1.25 / 0.9 <= share else "miss")
    # MaxText is 0.32x transformers' eager-experts step: JAX (MTP off, like the reference) / HF eager / 0.32
    maxtext = t["JAX >= 3x MaxText (MaxText = 0.32x transformers' eager step)"]
    assert maxtext["value"] == pytest.approx(1.1 / 0.9 / 0.32, abs=0.01) and maxtext["status"] == "pass"
    assert maxtext["note"].startswith("(jax jit / HF eager-experts)")
    assert t["torch speculative b1 greedy: faster than plain"]["status"] == "miss"  # 0.8x
    assert t["jax speculative b1 greedy: faster than plain"]["status"] == "pass"  # 1.3x
    assert t["torch speculative b1 greedy: tokens of plain greedy"]["status"] == "pass"
    assert t["jax speculative b1 greedy: tokens of plain greedy"]["status"] == "miss"
    res["targets"] = list(t.values())
    res["meta"]["loadavg_end"] = None
    paths = report.write_all(res, str(tmp_path))
    md = open(paths["markdown"]).read()
    assert "| torch | 1024 | 10000 | 5000 | 2.00× |" in md
    assert "| 50% | 2.00× | 1.10× |" in md  # torch eager's MFU, vs floor, vs the fastest HF row
    assert "error: RuntimeError: boom" in md
    assert "| jax b1 greedy | 154.0 | 200.0 | 1.30× | 85.0% | 1.85 | 30 |" in md
    assert os.path.getsize(paths["png"]) > 10_000


def test_end_peak_sweep_sets_mfu_from_the_higher_peak(monkeypatch):
    """Without --quick the peak is swept again at the end; MFU uses the higher of the two sweeps."""
    from types import SimpleNamespace

    import dsv3.bench as bench

    ctx = SimpleNamespace(peaks={"torch": 100.0, "jax": 50.0}, rows=[
        {"framework": "hf", "gflops": 40.0, "mfu": 0.4}, {"framework": "jax", "gflops": 40.0, "mfu": 0.8},
        {"framework": "torch", "gflops": 10.0, "mfu": None}])
    peaks = {"torch": {"peak_gflops": 100.0}, "jax": {"peak_gflops": 50.0}}
    monkeypatch.setattr(bench, "_peaks", lambda *a: {"torch": {"peak_gflops": 200.0}, "jax": {"peak_gflops": 40.0}})
    bench._end_peaks(ctx, peaks, ["torch", "jax"], set())
    assert peaks["torch"] == {"peak_gflops": 200.0, "peak_gflops_start": 100.0, "peak_gflops_end": 200.0}
    assert peaks["jax"] == {"peak_gflops": 50.0, "peak_gflops_start": 50.0, "peak_gflops_end": 40.0}
    assert [r["mfu"] for r in ctx.rows] == [0.2, 0.8, None]  # HF rows use torch's peak


def test_rows_of_another_dtype_use_that_dtypes_peak_and_floor():
    """--bf16-rows: a row's MFU is over the peak of its own dtype ("torch bf16"), its floor that dtype's;
    HF rows use torch's."""
    from types import SimpleNamespace

    from dsv3.bench.common import Ctx
    from dsv3.bench.timing import Timing

    ctx = Ctx(args=SimpleNamespace(), cfg=ModelConfig.preset("tiny"), device="cpu", dtype="fp32", batch=2, seq=4,
              contexts=[], decode_batch=2, decode_steps=1, warmup=0, reps=1, log=lambda s: None,
              peaks={"torch": 100.0, "torch bf16": 10.0})
    t = Timing(first_s=1.0, median_s=1.0, p25_s=1.0, p75_s=1.0, min_s=1.0, max_s=1.0, reps=1)
    assert ctx.add("train", "a", "torch", t, model_flops=5e9, dtype="bf16")["mfu"] == pytest.approx(0.5)
    assert ctx.add("train", "b", "torch", t, model_flops=5e9)["mfu"] == pytest.approx(0.05)
    assert ctx.add("train", "c", "hf", t, model_flops=5e9)["mfu"] == pytest.approx(0.05)
    assert ctx.add("train", "d", "jax", t, model_flops=5e9)["mfu"] is None  # no JAX peak measured
    # and its floor: the extra dtype's rows run MTP off
    ctx.floors = {"torch": {"floor_s": {"on": 2.0, "off": 1.0}}, "torch bf16": {"floor_s": {"off": 3.0}}}
    assert (ctx.floor_s("hf", False), ctx.floor_s("torch", True), ctx.floor_s("torch", False, "bf16")) == (1.0, 2.0, 3.0)
    assert ctx.floor_s("jax", False) is None


def test_cache_nbytes_walks_nested_caches():
    import numpy as np

    from dsv3.bench.rows import nbytes

    class Cache:  # like dsv3_torch's KVCache: fields, one of them a list of per-layer dicts
        def __init__(self):
            self.kind, self.max_len = "latent", 3
            self.layers = [{"c_kv": np.zeros((2, 3), np.float32)}, {"c_kv": np.zeros(4, np.int8)}]

    assert nbytes(Cache()) == 24 + 4
    assert nbytes([(np.zeros(2), {"a": np.zeros(1, np.float32)})]) == 16 + 4


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_profile_attributes_step_time(framework, capsys, one_torch_thread, tiny2_json):
    """python -m dsv3.bench.profile runs the bench's training step under the framework's profiler
    (its own process for JAX: that path sets XLA_FLAGS before JAX starts; torch's path runs in this
    process, through the same main) and attributes the time. torch on the tiny preset (--preset), JAX on
    the 2-layer tiny (--config), with XLA's default flags (the optimised code a user profiles: at LLVM level 0
    the cumsums' reduce-window kernels, which carry no HLO metadata, dominate) and the run's compilation
    cache directory in its environment (the profile must compile the step itself to read its HLO dump).
    JAX times 3 steps: the table's shares are then less at the mercy of one kernel delayed by the load."""
    import re
    import subprocess
    import sys

    model = ["--preset", "tiny"] if framework == "torch" else ["--config", tiny2_json]
    steps = "1" if framework == "torch" else "3"
    argv = [*model, "--framework", framework, "--batch", "2", "--seq", "16", "--steps", steps]
    if framework == "torch":  # no process start: torch's profiler needs no settings before torch starts
        from dsv3.bench.profile import main

        out = subprocess.CompletedProcess(argv, main(argv), *capsys.readouterr())
    else:
        out = subprocess.run([sys.executable, "-m", "dsv3.bench.profile", *argv],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = dict(re.findall(r"^\| (.+?) \| ([\d.]+) \|", out.stdout, flags=re.M))
    if framework == "torch":  # in-process: the products' op is that of this process's fp32 CPU matmuls
        from dsv3_torch import cpu_matmul

        op = {"mkl": "`aten::mm`", "onednn": "`mkldnn::_linear_pointwise`"}[cpu_matmul.backend()]
        assert float(rows.get(op, 0)) > 0, out.stdout
    else:
        assert float(rows["MoE: expert matmuls"]) > 0 and float(rows["attention: score and value matmuls"]) > 0
        # the kernels without HLO metadata (copies, broadcasts, XLA's reduce-windows) are a minority of the
        # time, not its largest part as at LLVM level 0: shares, not 0.1 ms-rounded times, are compared
        shares = [(int(p), c) for c, p in re.findall(r"^\| (.+?) \| [\d.]+ \| (\d+)% \|", out.stdout, flags=re.M)]
        unattributed = dict((c, p) for p, c in shares).get("unattributed (no HLO metadata)", 0)
        assert unattributed < 33 and max(shares)[1] != "unattributed (no HLO metadata)", out.stdout
