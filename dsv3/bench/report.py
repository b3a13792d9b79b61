"""Targets, markdown table, JSON file and PNG chart of one ``dsv3 bench`` run."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from dsv3.bench.rows import SPEC_PROMPT
from dsv3.fileio import atomic_write_text

# MaxText 0.2.5 (dense dropless MoE, no MTP) on peer-small, CPU fp32, seq 256, batch 8: its training step's
# tokens/s over transformers' eager-experts step, both measured on one machine.
MAXTEXT_VS_HF = 0.32


def _rows(res: dict, section: str, **match) -> list[dict]:
    out = []
    for r in res["rows"]:
        if r["section"] != section or "error" in r:
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def _best(rows: list[dict], key: str = "tokens_per_s") -> Optional[dict]:
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def _target(name: str, value, threshold, ok: Optional[bool], note: str = "") -> dict:
    return {"target": name, "value": value, "threshold": threshold,
            "status": "n/a" if ok is None else ("pass" if ok else "miss"), "note": note}


def evaluate_targets(res: dict) -> list[dict]:
    """The issue's targets, reported (never asserted)."""
    return [*_train_targets(res), *_decode_targets(res), *_moe_targets(res), *_mtp_targets(res),
            *_speculative_targets(res), *_long_targets(res)]


def _ratio_target(name: str, a: Optional[dict], b: Optional[dict], threshold: str, want: float) -> dict:
    """Rows a and b's tokens/s ratio against ``want`` (n/a when a row is missing)."""
    if not (a and b):
        return _target(name, None, threshold, None, "rows missing")
    r = a["tokens_per_s"] / b["tokens_per_s"]
    return _target(name, round(r, 3), threshold, r >= want, f"{a['name']} vs {b['name']}")


def _train_targets(res: dict) -> list[dict]:
    m = res["meta"]

    def train(dtype=None, **kw):
        """The fastest training row matching kw, in the run's dtype unless ``dtype`` (--bf16-rows) says."""
        return _best(_rows(res, "train", dtype=dtype, **kw))

    # our fastest torch step >= 1.25x HF's fastest, on the same work (MTP off: HF has no MTP)
    t = [_ratio_target("torch train step >= 1.25x HF (MTP off both)", train(framework="torch", mtp=False),
                       train(framework="hf"), ">= 1.25", 1.25)]
    # JAX jit >= the fastest torch row, same work, MTP on and off
    for mtp in ([True, False] if m["mtp_depths"] > 0 else [False]):
        t.append(_ratio_target(f"JAX jit >= fastest torch (MTP {'on' if mtp else 'off'})",
                               train(framework="jax", mtp=mtp), train(framework="torch", mtp=mtp), ">= 1.0", 1.0))
    # JAX >= 3x MaxText, MaxText's step expressed as a ratio to transformers' eager-experts step measured on
    # one machine (only meaningful for peer-small, CPU fp32, 256 x 8; the reference's work has no MTP)
    comparable = m["is_peer_small_shape"] and m["device"] == "cpu" and m["dtype"] == "fp32" and \
        m["seq"] == 256 and m["batch"] == 8
    jx, hf = train(framework="jax", mtp=False), train(framework="hf", variant="eager")
    if jx and hf:
        r = jx["tokens_per_s"] / hf["tokens_per_s"] / MAXTEXT_VS_HF
        t.append(_target(f"JAX >= 3x MaxText (MaxText = {MAXTEXT_VS_HF}x transformers' eager step)", round(r, 2),
                         ">= 3.0", (r >= 3.0) if comparable else None,
                         f"({jx['name']} / {hf['name']}) / {MAXTEXT_VS_HF}"
                         + ("" if comparable else "; not the peer-small CPU fp32 256x8 shape: not comparable")))
    # the fastest step's model FLOPs against the measured matmul peak (the aim at the medium size)
    fastest = _best([r for r in _rows(res, "train", dtype=None) if r.get("mfu") is not None], "mfu")
    if fastest:
        t.append(_target("fastest train step >= 60% of matmul peak (MFU)", round(fastest["mfu"], 3), ">= 0.60",
                         fastest["mfu"] >= 0.60, f"{fastest['name']}: {fastest['gflops']:.1f} GFLOP/s"))
    # each framework's fastest step within 1.3x of its own matmul floor
    for fw in ("torch", "jax"):
        r = _best([r for r in _rows(res, "train", framework=fw, dtype=None) if r.get("vs_floor")])
        if r:
            t.append(_target(f"{fw}: fastest train step <= 1.3x its matmul floor", round(r["vs_floor"], 2),
                             "<= 1.3", r["vs_floor"] <= 1.3, f"{r['name']}: floor {r['floor_s'] * 1e3:.1f} ms"))
    # --bf16-rows: the bf16 step against the same implementation's step in the run's dtype (MTP off); an
    # implementation the run has neither row of (torch compile under --skip compile) is left out
    for fw, variant in (("torch", "eager"), ("torch", "compile"), ("jax", "jit")):
        for dt in m.get("extra_dtypes") or []:
            low, base = (train(framework=fw, variant=variant, mtp=False, dtype=d) for d in (dt, None))
            if low or base:
                t.append(_ratio_target(f"{fw} {variant} {dt} step >= 1.5x its {m['dtype']} step (MTP off)",
                                       low, base, ">= 1.5", 1.5))
    return t


def _decode_targets(res: dict) -> list[dict]:
    """Absorbed decoding beats naive from 1024 up (aim 3x at 4096); the latent cache holds exactly
    kv_lora_rank + qk_rope_head_dim values per token per layer."""
    t: list[dict] = []
    for fw in ("torch", "jax"):
        lat = {r["context"]: r for r in _rows(res, "decode", framework=fw, kind="latent")}
        nai = {r["context"]: r for r in _rows(res, "decode", framework=fw, kind="naive")}
        big = [n for n in sorted(set(lat) & set(nai)) if n >= 1024]
        if not big:
            t.append(_target(f"{fw}: absorbed decoding beats naive from 1024 up", None, "> 1.0", None,
                             "no context >= 1024 measured"))
            continue
        ratios = {n: lat[n]["tokens_per_s"] / nai[n]["tokens_per_s"] for n in big}
        t.append(_target(f"{fw}: absorbed decoding beats naive from 1024 up",
                         {str(n): round(v, 2) for n, v in ratios.items()}, "> 1.0",
                         all(v > 1.0 for v in ratios.values())))
        top = max(ratios)
        if top >= 4000:  # 4096, or 4096 minus the decode steps when the config caps the context
            t.append(_target(f"{fw}: absorbed 3x naive at ~4096 (aim)", round(ratios[top], 2), ">= 3.0",
                             ratios[top] >= 3.0, f"context {top}"))
    want = res["meta"]["kv_lora_rank"] + res["meta"]["qk_rope_head_dim"]
    for fw in ("torch", "jax"):
        rows = _rows(res, "decode", framework=fw, kind="latent")
        if rows:
            got = rows[0]["cache_values_per_token_per_layer"]
            t.append(_target(f"{fw}: latent cache = C + R values/token/layer", got, want, math.isclose(got, want)))
    return t


def _moe_targets(res: dict) -> list[dict]:
    """Grouped MoE <= 1.3x a dense MLP of the same active FLOPs."""
    t = []
    for fw in ("torch", "jax"):
        for phase in ("forward", "fwd+bwd"):
            m = _rows(res, "moe", framework=fw, kind="moe", phase=phase)
            d = _rows(res, "moe", framework=fw, kind="dense", phase=phase)
            if m and d:
                r = m[0]["median_s"] / d[0]["median_s"]
                t.append(_target(f"{fw}: MoE layer {phase} <= 1.3x dense", round(r, 2), "<= 1.3", r <= 1.3))
    return t


def _mtp_targets(res: dict) -> list[dict]:
    """MTP adds no more than its FLOP share."""
    if res["meta"]["mtp_depths"] == 0:
        return []
    t = []
    share = res["flops"]["mtp_flop_share"]
    for fw, variant in (("torch", "eager"), ("torch", "compile"), ("jax", "jit")):
        on = _rows(res, "train", framework=fw, variant=variant, mtp=True, dtype=None)
        off = _rows(res, "train", framework=fw, variant=variant, mtp=False, dtype=None)
        if on and off:
            r = on[0]["median_s"] / off[0]["median_s"]
            t.append(_target(f"{fw} {variant}: MTP time share <= FLOP share", round(r, 3),
                             f"<= {share:.3f}", r <= share))
    return t


def _speculative_targets(res: dict) -> list[dict]:
    """Speculative decoding faster than plain decoding at batch 1 (DeepSeek-V3 reports 1.8x, with 85-90% of
    the drafts accepted); greedy gives the tokens of plain decoding."""
    t = []
    for r in _rows(res, "speculative", batch=1):
        t.append(_target(f"{r['framework']} speculative b1 {r['mode']}: faster than plain", round(r["speedup"], 2),
                         "> 1.0", r["speedup"] > 1.0, f"acceptance {r['acceptance_rate']:.0%}"))
    for r in _rows(res, "speculative", mode="greedy"):
        t.append(_target(f"{r['framework']} speculative b{r['batch']} greedy: tokens of plain greedy",
                         r["same_tokens_as_plain"], "True", bool(r["same_tokens_as_plain"])))
    return t


def _long_targets(res: dict) -> list[dict]:
    """Generation after a long prompt, end to end, >= 1.5x transformers (same weights, prompt and number of
    new tokens, so the tokens/s ratio is transformers' time over ours)."""
    hf = _best(_rows(res, "long", framework="hf"))
    return [_ratio_target(f"{r['framework']} long prompt end to end >= 1.5x transformers", r, hf, ">= 1.5", 1.5)
            for r in _rows(res, "long") if hf and r["framework"] != "hf"]


# -------------------------------------------------------------------- markdown
def _f(x, fmt="{:.1f}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return fmt.format(x)


def _malloc(settings) -> str:
    if not settings:
        return "default"
    return ", ".join(f"{k} {v >> 20} MiB" if v >= 1 << 20 else f"{k} {v}" for k, v in settings.items())


def markdown(res: dict) -> str:
    L = _header(res)
    L += _table("### Training step (forward + backward + AdamW + bias update)", TRAIN_COLUMNS,
                _section(res, "train"), 2, _train_cells(res))
    L += _floor_table(res)
    m = res["meta"]
    L += _table(f"### Prefill forward (logits of {m['batch']} × {m['seq']} tokens)", PREFILL_COLUMNS,
                _section(res, "prefill"), 1, _prefill_cells)
    L += _decode_table(res)
    L += _cache_table(res)
    L += _moe_table(res)
    L += _table(f"### Speculative decoding, MTP draft ({m.get('spec_new')} new tokens after {SPEC_PROMPT}-token "
                f"prompts; {'weights of ' + m['checkpoint'] if m.get('checkpoint') else 'random weights'}; "
                f"DeepSeek-V3 reports 85-90% acceptance, 1.8x)", SPEC_COLUMNS, _section(res, "speculative"), 1,
                _spec_cells)
    L += _long_table(res)
    L += _targets_table(res)
    errors = [r for r in res["rows"] if "error" in r]
    if errors:
        L += [f"{len(errors)} row(s) failed; full tracebacks in the JSON file.", ""]
    return "\n".join(L)


def _header(res: dict) -> list[str]:
    """Title, machine and versions, how to read the figures, the matmul peak, the model FLOPs."""
    m, fl = res["meta"], res["flops"]
    env = m["env"]
    L = [f"## `dsv3 bench` — {m['config_name']}, {m['device']} {m['dtype']}, batch {m['batch']} × seq {m['seq']}"
         + (" (--quick)" if m["quick"] else ""), ""]
    L += [f"{env.get('cpu_model')} · {env.get('cpu_count')} CPUs (affinity {env.get('cpu_affinity')}) · "
          f"torch {m['versions'].get('torch')} threads {m.get('torch_threads')} "
          f"(OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY') or 'unset'}) · "
          f"jax {m['versions'].get('jax')} · transformers {m['versions'].get('transformers')} · "
          f"load avg start {env.get('loadavg_start')} end {m.get('loadavg_end')} · {env.get('time_utc')}"
          f" · XLA_FLAGS `{env.get('XLA_FLAGS') or ''}` · malloc {_malloc(env.get('malloc'))}"
          f" · JAX CPU dispatch {'synchronous' if env.get('jax_sync_dispatch') else 'asynchronous'}"
          f" · GLIBC_TUNABLES `{env.get('GLIBC_TUNABLES') or ''}`"
          + (f" · commit {m['git']['commit'][:10]}{' (dirty)' if m['git'].get('dirty') else ''}"
             if m.get("git", {}).get("commit") else ""), ""]
    L += ["Median of timed repetitions after warm-up; IQR = inter-quartile range / median; "
          "first = the first call alone (tracing, compilation). Ratios compare rows of this one run.", ""]
    if res.get("peaks"):
        L += ["**Matmul peak** (best median over the shape sweep, layouts nn = A·B and nt = A·Wᵀ, same run): "
              + ", ".join(_peak(k, v) for k, v in res["peaks"].items()), ""]
    L += [f"**Model FLOPs** (`dsv3/flops.py`): train {fl['train_flops_per_token_mtp'] / 1e6:.2f} MFLOP/token "
          f"with MTP, {fl['train_flops_per_token'] / 1e6:.2f} without (MTP share ×{fl['mtp_flop_share']:.3f}); "
          f"{fl['params']['total'] / 1e6:.2f} M parameters, {fl['params']['active_per_token'] / 1e6:.2f} M active "
          "per token.", ""]
    return L


def _peak(k: str, v: dict) -> str:
    return (f"{k} {v['peak_gflops']:.1f} GFLOP/s at {'×'.join(map(str, v['peak_shape']))}"
            + (f" ({v['peak_layout']})" if v.get("peak_layout") else "")
            + (f" ({'oneDNN' if v['cpu_matmul'] == 'onednn' else 'MKL'})" if v.get("cpu_matmul") else "")
            + (f" (sweep at start {v['peak_gflops_start']:.1f}, at end {v['peak_gflops_end']:.1f}; MFU uses the higher)"
               if "peak_gflops_end" in v else ""))


def _section(res: dict, section: str) -> list[dict]:
    """Every row of a section, failed ones included."""
    return [r for r in res["rows"] if r["section"] == section]


def _table(title: str, columns: tuple[str, str], rows: list[dict], lead: int, cells) -> list[str]:
    """A table of result rows, one line a row: ``cells(row)``, or for a failed row its first
    ``lead`` cells and the error, the remaining columns left empty."""
    if not rows:
        return []
    L = [title, "", *columns]
    n = columns[0].count("|") - 1
    for r in rows:
        c = cells(r)
        if "error" in r:
            L.append("| " + " | ".join(c[:lead] + [f"error: {_err(r)} "]) + "|" * (n - lead))
        else:
            L.append("| " + " | ".join(c) + " |")
    return L + [""]


TRAIN_COLUMNS = ("| implementation | MTP | tokens/s | median ms | IQR | first call s | GFLOP/s | MFU | vs floor | "
                 "vs HF | peak RSS MB | first main loss |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
PREFILL_COLUMNS = ("| implementation | tokens/s | median ms | IQR | first call s | GFLOP/s | MFU |",
                   "|---|--:|--:|--:|--:|--:|--:|")


SPEC_COLUMNS = ("| row | plain tokens/s | MTP tokens/s | speed-up | acceptance | mean accepted length | "
                "verify calls |", "|---|--:|--:|--:|--:|--:|--:|")


def _spec_cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["name"]]
    return [r["name"], f"{r['plain_tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}×",
            _f(r["acceptance_rate"], "{:.1%}"), _f(r["mean_accepted_length"], "{:.2f}"), str(r["verify_calls"])]


LONG_COLUMNS = ("| row | prompt | new tokens | seconds | IQR | first (s) | vs transformers | tokens of transformers |",
                "|---|--:|--:|--:|--:|--:|--:|--:|")


def _long_table(res: dict) -> list[str]:
    """Generation after a long prompt (batch 1, greedy, end to end): each row's time against transformers',
    and whether it generated the same tokens."""
    rows = _section(res, "long")
    hf = _best(_rows(res, "long", framework="hf"))

    def cells(r: dict) -> list[str]:
        if "error" in r:
            return [r["name"]]
        vs = f"{hf['median_s'] / r['median_s']:.2f}×" if hf else "–"
        same = "–" if not hf or r is hf else str(r["out_tokens"] == hf["out_tokens"])
        return [r["name"], str(r["prompt_tokens"]), str(r["new_tokens"]), f"{r['median_s']:.2f}",
                f"{r['iqr_rel']:.0%}", f"{r['first_s']:.2f}", vs, same]

    return _table("### Long prompt, end to end (batch 1, greedy: the cached prefill, then one token a call)",
                  LONG_COLUMNS, rows, 1, cells)


def _timing_cells(r: dict) -> list[str]:
    return [f"{r['tokens_per_s']:.0f}", f"{r['median_s'] * 1e3:.1f}", f"{r['iqr_rel']:.0%}", f"{r['first_s']:.2f}",
            _f(r.get("gflops")), _f(r.get("mfu"), "{:.0%}")]


def _prefill_cells(r: dict) -> list[str]:
    return [r["name"]] + ([] if "error" in r else _timing_cells(r))


def _train_cells(res: dict):
    hf = _best(_rows(res, "train", framework="hf"))

    def cells(r: dict) -> list[str]:
        lead = [r["name"], "on" if r.get("mtp") else "off"]
        if "error" in r:
            return lead
        vs = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        return lead + _timing_cells(r) + [_f(r.get("vs_floor"), "{:.2f}×"), _f(vs, "{:.2f}×"),
                                          _f(r.get("peak_mb"), "{:.0f}"),
                                          _f(r.get("main_loss_first", r.get("loss_first")), "{:.5f}")]

    return cells


def _floor_table(res: dict) -> list[str]:
    """Each framework's matmul floor of the training step and the products that make most of it."""
    floors = res.get("floors") or {}
    if not floors:
        return []
    L = ["### Matmul floor of the training step (`dsv3.flops.step_matmuls`, each product timed alone; "
         "JAX's in a jitted loop of its repeats, as a compiled step runs it)", "",
         "; ".join(f"{fw}: " + ", ".join(f"MTP {k} {v * 1e3:.1f} ms" for k, v in f["floor_s"].items())
                   + f" (less {f['call_overhead_s'] * 1e6:.1f} µs a product, a 1×1×1 call)"
                   for fw, f in floors.items())
         + ". Products of 2% of a floor or more (with MTP when measured), largest first:", "",
         "| framework | products | b × M × K × N | layout | per step | ms each | GFLOP/s | share of floor |",
         "|---|---|--:|---|--:|--:|--:|--:|"]
    for fw, f in floors.items():
        key = "on" if "on" in f["floor_s"] else "off"
        total = f["floor_s"][key]
        mms = sorted((e for e in f["matmuls"] if key in e["count"]), key=lambda e: -e["count"][key] * e["net_s"])
        for e in mms:
            share = e["count"][key] * e["net_s"] / total if total else 0.0
            if share < 0.02:
                continue
            L.append(f"| {fw} | {e['what']} | {e['b']} × {e['m']} × {e['k']} × {e['n']} | {e['layout']} | "
                     f"{e['count'][key]:g} | {e['median_s'] * 1e3:.3f} | {e['gflops']:.1f} | {share:.0%} |")
    return L + [""]


def _decode_table(res: dict) -> list[str]:
    m, dec = res["meta"], _section(res, "decode")
    if not dec:
        return []
    L = [f"### Decoding (batch {m['decode_batch']}, one token per step, cache sized context + {m['decode_steps']})",
         "", "| framework | context | latent tok/s | naive tok/s | latent / naive | latent ms/step (IQR) | "
         "naive ms/step (IQR) | first call s (latent / naive) |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for fw in ("torch", "jax"):
        for n in m["contexts"]:
            lat, nai = ([r for r in dec if r["framework"] == fw and r.get("kind") == k and r.get("context") == n]
                        for k in ("latent", "naive"))
            if not lat and not nai:
                continue
            lat, nai = (lat[0] if lat else {}), (nai[0] if nai else {})
            ratio = (lat["tokens_per_s"] / nai["tokens_per_s"]) if "tokens_per_s" in lat and \
                "tokens_per_s" in nai else None
            L.append(f"| {fw} | {n} | {_f(lat.get('tokens_per_s'), '{:.0f}', _err(lat))} | "
                     f"{_f(nai.get('tokens_per_s'), '{:.0f}', _err(nai))} | {_f(ratio, '{:.2f}×')} | "
                     f"{_ms_iqr(lat)} | {_ms_iqr(nai)} | {_f(lat.get('first_s'), '{:.2f}')} / "
                     f"{_f(nai.get('first_s'), '{:.2f}')} |")
    return L + [""]


def _moe_table(res: dict) -> list[str]:
    m, moe = res["meta"], _section(res, "moe")
    if not moe:
        return []
    L = [f"### MoE layer alone vs a dense SwiGLU of the same active FLOPs (width "
         f"{res['flops']['moe_layer_flops_per_token']['dense_equivalent_width']}, {m['batch'] * m['seq']} tokens)",
         "", "| framework | pass | MoE ms | dense ms | MoE / dense | MoE GFLOP/s | dense GFLOP/s |",
         "|---|---|--:|--:|--:|--:|--:|"]
    for fw in ("torch", "jax"):
        L += [f"| {fw} | error: {_err(r)} ||||||" for r in moe if r["framework"] == fw and "error" in r]
        for phase in ("forward", "fwd+bwd"):
            a, b = ([r for r in moe if r["framework"] == fw and r.get("kind") == k and r.get("phase") == phase]
                    for k in ("moe", "dense"))
            if a and b:
                a, b = a[0], b[0]
                L.append(f"| {fw} | {phase} | {a['median_s'] * 1e3:.2f} | {b['median_s'] * 1e3:.2f} | "
                         f"{a['median_s'] / b['median_s']:.2f}× | {a['gflops']:.1f} | {b['gflops']:.1f} |")
    return L + [""]


def _targets_table(res: dict) -> list[str]:
    if not res.get("targets"):
        return []
    L = ["### Targets (reported, not asserted)", "", "| target | measured | want | status | note |",
         "|---|--:|--:|---|---|"]
    for t in res["targets"]:
        v = t["value"]
        v = ", ".join(f"{k}: {x}" for k, x in v.items()) if isinstance(v, dict) else _f(v, "{}")
        L.append(f"| {t['target']} | {v} | {t['threshold']} | {t['status'].upper()} | {t['note']} |")
    return L + [""]


def _cache_table(res: dict) -> list[str]:
    m, fl = res["meta"], res["flops"]
    L = ["### KV cache per token per layer", "",
         "| cache | values (formula) | bytes (formula, run dtype) | measured bytes torch | measured bytes jax |",
         "|---|--:|--:|--:|--:|"]
    Ln = m["layers"]
    b = fl["kv_cache_bytes_per_token"]
    v = fl["kv_cache_values_per_token"]
    for kind, label in (("latent", "latent (absorbed): C + R"), ("naive", "naive expanded K/V"),
                        ("mha", "standard MHA 2·H·d_h (Paper Table 1)")):
        meas = {}
        for fw in ("torch", "jax"):
            rows = _rows(res, "decode", framework=fw, kind=kind)
            meas[fw] = rows[0]["cache_bytes_per_token_per_layer"] if rows else None
        L.append(f"| {label} | {v[kind] // Ln} | {b[kind] // Ln} | {_f(meas['torch'], '{:.0f}')} | "
                 f"{_f(meas['jax'], '{:.0f}')} |")
    L.append("")
    L.append(f"Whole model ({Ln} layers), {fl['kv_cache_dtype']}: latent {b['latent']:,} B/token, naive "
             f"{b['naive']:,} B/token ({b['naive'] / b['latent']:.1f}× more), MHA {b['mha']:,} B/token.")
    L.append("")
    return L


def _ms_iqr(r: dict) -> str:
    if "median_s" not in r:
        return "–"
    return f"{r['median_s'] * 1e3:.2f} ({r['iqr_rel']:.0%})"


def _err(r: dict) -> str:
    e = r.get("error")
    if not e:
        return "–"
    return e.splitlines()[0][:80].replace("|", "/")


# ------------------------------------------------------------------------ chart
COLORS = {"torch": "tab:red", "jax": "tab:blue", "hf": "tab:gray"}


def chart(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    m = res["meta"]
    fig.suptitle(f"dsv3 bench — {m['config_name']}, {m['device']} {m['dtype']}, batch {m['batch']} × seq {m['seq']}"
                 f" (load {m['env'].get('loadavg_start')})")
    _train_panel(axes[0][0], res)
    _prefill_panel(axes[0][1], res)
    _decode_panel(axes[1][0], res)
    _moe_panel(axes[1][1], res)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _train_panel(ax, res: dict) -> None:
    """Training tokens/s with IQR bars and each row's MFU."""
    tr = _rows(res, "train")
    if tr:
        vals = [r["tokens_per_s"] for r in tr]
        errs = [[abs(r["tokens_per_s"] - r["tokens"] / r["p25_s"]) for r in tr],
                [abs(r["tokens"] / r["p75_s"] - r["tokens_per_s"]) for r in tr]]
        ax.barh([r["name"] for r in tr], vals, xerr=errs, color=[COLORS[r["framework"]] for r in tr])
        ax.invert_yaxis()
        for i, r in enumerate(tr):
            if r.get("mfu") is not None:
                ax.text(vals[i], i, f" {r['mfu']:.0%} MFU", va="center", fontsize=8)
    ax.set_title("training step, tokens/s (median, IQR bars)")
    ax.set_xlabel("tokens/s")


def _prefill_panel(ax, res: dict) -> None:
    pre = _rows(res, "prefill")
    if pre:
        ax.barh([r["name"] for r in pre], [r["tokens_per_s"] for r in pre],
                color=[COLORS[r["framework"]] for r in pre])
        ax.invert_yaxis()
    ax.set_title("prefill forward, tokens/s")
    ax.set_xlabel("tokens/s")


def _decode_panel(ax, res: dict) -> None:
    """Decoding tokens/s against the context length, latent and naive cache."""
    for fw in ("torch", "jax"):
        for kind, style in (("latent", "-o"), ("naive", "--s")):
            rows = sorted(_rows(res, "decode", framework=fw, kind=kind), key=lambda r: r["context"])
            if rows:
                ax.plot([r["context"] for r in rows], [r["tokens_per_s"] for r in rows], style, color=COLORS[fw],
                        label=f"{fw} {kind}")
    if ax.lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title(f"decoding tokens/s (batch {res['meta']['decode_batch']})")
    ax.set_xlabel("context length")


def _moe_panel(ax, res: dict) -> None:
    labels, moe_ms, dense_ms = [], [], []
    for fw in ("torch", "jax"):
        for phase in ("forward", "fwd+bwd"):
            a = _rows(res, "moe", framework=fw, kind="moe", phase=phase)
            b = _rows(res, "moe", framework=fw, kind="dense", phase=phase)
            if a and b:
                labels.append(f"{fw}\n{phase}")
                moe_ms.append(a[0]["median_s"] * 1e3)
                dense_ms.append(b[0]["median_s"] * 1e3)
    if labels:
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], moe_ms, 0.4, label="grouped MoE", color="tab:purple")
        ax.bar([x + 0.2 for x in xs], dense_ms, 0.4, label="dense SwiGLU, same FLOPs", color="tab:green")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.legend(fontsize=8)
    ax.set_title("MoE layer vs dense MLP, ms")


def write_all(res: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "markdown": os.path.join(out_dir, "bench.md"),
             "png": os.path.join(out_dir, "bench.png")}
    atomic_write_text(paths["json"], json.dumps(res, indent=1, default=_json_default) + "\n")
    atomic_write_text(paths["markdown"], markdown(res) + "\n")
    chart(res, paths["png"])
    return paths


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)
