"""Collectives of a compiled program, counted from its HLO text, next to the analytic formula of
docs/scaling.md section 4.

``count_collectives(compiled)`` reads ``jax.stages.Compiled.as_text()`` (or any HLO module text) and
returns, per collective kind, how many instructions there are and the bytes each device moves, with
the ring formulas of docs/scaling.md section 4 applied to each instruction's operands and group size g:

    all-gather         (g-1) * operand        (= (g-1)/g * X, X the gathered result)
    reduce-scatter     (g-1)/g * operand
    all-reduce         2 (g-1)/g * operand
    all-to-all         (g-1)/g * operand
    collective-permute operand

The asynchronous forms (``all-gather-start`` ...) are counted under their plain kind (their ``-done``
halves move nothing). Tuple-shaped (variadic) collectives count every operand. Group sizes come from
``replica_groups`` in both the explicit ``{{0,1},{2,3}}`` and the iota ``[2,4]<=[8]`` forms; an empty
list means every device (``num_partitions`` of the module).

**Loops.** A collective inside a ``while`` body (the micro-batch ``scan`` of the training step) is
multiplied by the loop's trip count when the HLO states it (``known_trip_count`` in the while's
``backend_config``), nested loops multiplied through; a loop without a known count (a trip count that
depends on the data, as the MoE expert loop's) is counted once per body and, when its body holds
collectives, reported in ``unknown_trip_count``. So the numbers are per execution of the program
(one optimizer step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                 "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                 "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[\(\{]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP = re.compile(r"\s(" + "|".join(KINDS) + r")(-start)?\(")
_TRIP = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)')


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (``f32[8,16]{1,0}``, tuples ``(bf16[4], s32[])``)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in ELEMENT_BYTES:
            continue
        total += ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(attrs: str, num_partitions: int = 1) -> int:
    """Size of each replica group in an instruction's attributes: ``replica_groups={{0,1},{2,3}}``
    (2), ``replica_groups=[2,4]<=[8]`` (4), ``[4,2]<=[2,2,2]T(0,2,1)`` (2), ``replica_groups={}``
    (all ``num_partitions`` devices), ``replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`` (4)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:  # mesh-axes form: mesh['axis_0'=1,'axis_1'=8] {'axis_1'}, the named axes form a group
        sizes = {a: int(v) for a, v in re.findall(r"'?([\w]+)'?=(\d+)", m.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'?([\w]+)'?", m.group(2)))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\s*\{([0-9,\s]*)\}", attrs)
    if m and m.group(1).strip():
        return len(m.group(1).split(","))
    return num_partitions


def moved_bytes(kind: str, operand_bytes: int, g: int) -> float:
    """Bytes one device moves for one collective of ``kind`` on operands of ``operand_bytes``
    (per device) over groups of ``g`` (ring algorithms)."""
    if kind == "all-gather":
        return (g - 1) * operand_bytes
    if kind in ("reduce-scatter", "all-to-all"):
        return (g - 1) / g * operand_bytes
    if kind == "all-reduce":
        return 2 * (g - 1) / g * operand_bytes
    if kind == "collective-permute":
        return float(operand_bytes)
    raise ValueError(f"unknown collective {kind!r}")


def _split_top(s: str) -> tuple[str, str]:
    """``s`` starting after an opening parenthesis: (text up to the matching one, the rest)."""
    depth = 1
    for i, c in enumerate(s):
        depth += (c in "({[") - (c in ")}]")
        if depth == 0:
            return s[:i], s[i + 1:]
    return s, ""


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMP_HEAD.match(line.strip())
            if m and line.rstrip().endswith("{") and not line.startswith("HloModule"):
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        comps[cur].append(line)
    return comps, entry


def collectives(compiled_or_text, num_partitions: int | None = None) -> tuple[list[dict], int]:
    """Every collective instruction of the program: ``[{"name", "kind", "computation", "times",
    "group", "operand_bytes", "bytes"}]`` (``times``: executions per run, loops multiplied through;
    ``bytes``: per device, all executions), and the number of loops without a known trip count whose
    bodies hold collectives (directly or in the computations they call)."""
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    if num_partitions is None:
        m = re.search(r"num_partitions=(\d+)", text)
        num_partitions = int(m.group(1)) if m else 1
    comps, entry = _computations(text)
    if entry is None:  # a bare list of instructions
        comps, entry = {"entry": text.splitlines()}, "entry"
    mult: dict[str, int] = {}  # how often each computation runs per execution of the entry computation
    in_unknown: dict[str, set[int]] = {}  # computation -> the loops without a trip count it runs inside
    n_loops = 0

    def visit(name: str, k: int, loops: frozenset = frozenset()) -> None:
        nonlocal n_loops
        mult[name] = mult.get(name, 0) + k
        in_unknown.setdefault(name, set()).update(loops)
        for line in comps.get(name, ()):
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            if body and " while(" in line:
                trip = _TRIP.search(line)
                if trip is None:
                    n_loops += 1
                visit(body.group(1), k * (int(trip.group(1)) if trip else 1),
                      loops if trip else loops | {n_loops})
                continue
            for callee in re.findall(r"\b(?:calls|branch_computations|true_computation|false_computation)="
                                     r"\{?%?([\w.\-, %]+)\}?", line):
                for c in re.split(r"[,\s]+", callee.replace("%", "")):
                    if c in comps and c != name:
                        visit(c, k, loops)

    visit(entry, 1)
    found = []
    for name, k in mult.items():
        for line in comps.get(name, ()):
            m = _INSTR.match(line)
            if not m:
                continue
            op = _OP.search(" " + m.group(2))
            if not op:
                continue
            kind = op.group(1)
            operands, attrs = _split_top(m.group(2)[op.end() - 1:])
            g = group_size(attrs, num_partitions)
            ob = shape_bytes(operands)
            if ob == 0:  # operands printed without shapes: from the result shape (before the op name)
                res = shape_bytes(m.group(2)[:op.start()])
                if kind == "all-gather":  # result g x operand; all-gather-start: (operand, result)
                    ob = res // (g + 1 if op.group(2) else g)
                elif kind == "reduce-scatter":  # result = operand / g
                    ob = res * g
                else:  # same shape; collective-permute-start: (operand, result, contexts)
                    ob = res // 2 if op.group(2) and kind != "all-reduce" else res
            found.append({"name": m.group(1), "kind": kind, "computation": name, "times": k, "group": g,
                          "operand_bytes": ob, "bytes": k * moved_bytes(kind, ob, g)})
    return found, len(set().union(*(in_unknown[c["computation"]] for c in found)))


def count_collectives(compiled_or_text, num_partitions: int | None = None) -> dict:
    """Per kind: ``{"count": executions per run, "bytes": bytes per device}``, plus ``"total_bytes"``
    and ``"unknown_trip_count"`` (loops without a trip count around collectives, their bodies counted
    once). ``compiled_or_text``: a ``jax.stages.Compiled`` or HLO module text."""
    found, unknown = collectives(compiled_or_text, num_partitions)
    out: dict = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
    for c in found:
        out[c["kind"]]["count"] += c["times"]
        out[c["kind"]]["bytes"] += c["bytes"]
    out["total_bytes"] = sum(out[k]["bytes"] for k in KINDS)
    out["unknown_trip_count"] = unknown
    return out


def analytic_bytes(cfg, mesh: Mapping[str, int], *, grad_accum: int, tokens_per_micro_batch: int,
                   compute_bytes: int = 4, param_bytes: int = 4) -> dict:
    """The formulas of docs/scaling.md section 4 for one optimizer step, bytes per device per kind.

    ``mesh``: axis sizes (``dsv3_jax.sharding.parse_mesh``); ``tokens_per_micro_batch``: n, tokens each
    device holds per micro-batch; weights are split per ``dsv3_jax.sharding.spec_table``. FSDP weights
    are gathered in ``param_bytes`` (GSPMD gathers the stored fp32 weight; the cast follows)."""
    from dsv3.names import canonical_shapes
    from dsv3_jax import sharding

    sizes = sharding.parse_mesh(mesh)
    d, f, s = sizes["data"], sizes["fsdp"], sizes["expert"]
    k, n = grad_accum, tokens_per_micro_batch
    table = sharding.spec_table(cfg, sizes)
    shapes = canonical_shapes(cfg)
    w_fsdp = 0.0  # bytes of fsdp-split weights, each as seen by one expert shard (experts: E/s slice)
    ar = 0.0
    for name, shape in shapes.items():
        spec = tuple(table[name])
        full = math.prod(shape) * param_bytes
        local = full / sharding.shard_factor(table[name], sizes)
        if "fsdp" in spec:
            w_fsdp += local * f
        g = d if "expert" in spec else d * s
        ar += 2 * (g - 1) / g * local
    L = sum(1 for nm in shapes if nm.endswith(".ffn.gate.weight"))
    D, K, E = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    ep_in = k * L * (s - 1) * n * (D * compute_bytes + 8 * K)  # x, ids, weights gathered over expert
    ep_out = k * L * (s - 1) * n * D * 4  # fp32 partial outputs, psum-scattered
    return {
        "all-gather": 2 * k * (f - 1) / f * w_fsdp + ep_in + ep_out,  # EP backward of the scatter: a gather
        "reduce-scatter": k * (f - 1) / f * w_fsdp + ep_out + (ep_in if s > 1 else 0),
        "all-reduce": ar + L * E * 4,
        "all-to-all": 0.0,
        "collective-permute": 0.0,
    }
