"""The device mesh and the sharding rules of dsv3_jax, applied from outside the model.

The model files stay single-device; this module places an existing model, its optimizer state and
each batch on a mesh, and the jitted training step (``dsv3_jax.train``) runs under GSPMD: XLA inserts
the collectives that the shardings imply (FSDP all-gathers of weights before use, reduce-scatters
of their gradients, an all-reduce of data-parallel gradients).

Mesh axes (always all three; an axis not asked for has size 1):

    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with parameters, gradients and AdamW state split (ZeRO-3 style)
    expert  expert parallelism: routed experts split by expert id; the batch is split over it too

The batch is split over ("data", "fsdp", "expert"): every device holds distinct tokens.

**Axis types: Auto, on purpose.** ``jax.make_mesh`` in jax 0.10 makes *Explicit* axes by default
(sharding in types): every op then must be able to state its output sharding, and GSPMD-style code
fails at trace time -- ``jax.lax.with_sharding_constraint`` and contractions over a sharded dimension
raise, ``jnp.bincount`` on sharded expert ids raises ShardingTypeError, and a scan carry whose
sharding changes is rejected. The model is written for one device and sharded from outside, so the
mesh is built with ``AxisType.Auto`` on every axis: the input and parameter shardings are given, and
XLA's sharding propagation decides the rest.

**The rules** (``RULES``) map each canonical parameter name (torch layout, ``[out, in]``; experts
``[E, out, in]``; names as ``dsv3.names.canonical_shapes``) to a ``PartitionSpec``. An axis that
does not divide its dimension is dropped from that dimension (the tensor is then replicated over it);
``spec_for`` reports the spec actually used, so the byte counts of ``planned_bytes`` are exact.
AdamW moments follow their parameter; the step count is replicated.

Expert parallelism (``dsv3_jax.expert_parallel.ExpertParallelDispatcher``, installed by the JAX
backend when ``expert`` > 1) runs the routed experts inside ``jax.shard_map``; docs/scaling.md has
the layout, the table and what each collective moves.

Shape legend: B batch, T time, N = B*T tokens, D model width, E routed experts, K experts per token,
F expert width, V vocab, S shards of the expert axis, El = E/S local experts.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dsv3.mesh import AXES, format_mesh, mesh_size, parse_mesh  # noqa: F401 (re-exported)
from dsv3.config import ModelConfig

BATCH_AXES = ("data", "fsdp", "expert")  # the batch dimension is split over all three

# Canonical name (regex, full match) -> spec in torch layout. First match wins.
RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed\.weight", ("fsdp", None)),                                  # [V, D]
    (r"head\.weight", ("fsdp", None)),                                   # [V, D]
    (r"(.+\.)?(norm|attn_norm|ffn_norm|q_norm|kv_norm|enorm|hnorm)\.weight", (None,)),  # [D] replicated
    (r".+\.attn\.(wq|wq_a|wq_b|wkv_a|wkv_b|wo)\.weight", ("fsdp", None)),  # [out, in]
    (r".+\.ffn\.gate\.weight", (None, "fsdp")),                          # router [E, D]
    (r".+\.ffn\.gate\.bias", (None,)),                                   # router bias [E], fp32, replicated
    (r".+\.ffn\.experts\.(w1|w2|w3)", ("expert", "fsdp", None)),          # routed [E, F, D] / [E, D, F]
    (r".+\.ffn\.shared_experts\.(w1|w2|w3)\.weight", ("fsdp", None)),     # [out, in]
    (r".+\.ffn\.(w1|w2|w3)\.weight", ("fsdp", None)),                     # dense MLP [out, in]
    (r"mtp\.\d+\.eh_proj\.weight", ("fsdp", None)),                      # [D, 2D]
)


# ------------------------------------------------------------------- mesh
def make_mesh(shape: str | Mapping[str, int], devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ("data", "fsdp", "expert"), all AxisType.Auto (see the module docstring).

    Uses the first data*fsdp*expert devices (or ``devices``)."""
    sizes = parse_mesh(shape)
    n = mesh_size(sizes)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"mesh {format_mesh(sizes)} needs {n} devices, only {len(devices)} available "
                         f"(on CPU, `dsv3 --cpu-devices {n}` or XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         f"before jax starts)")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices[:n])


def mesh_shape(mesh: jax.sharding.Mesh) -> dict[str, int]:
    return {a: int(mesh.shape.get(a, 1)) for a in AXES}


# ------------------------------------------------------------------ rules
def rule_for(name: str) -> tuple:
    """The RULES entry (torch-layout spec tuple) for a canonical name; KeyError if none matches."""
    for pattern, spec in RULES:
        if re.fullmatch(pattern, name):
            return spec
    raise KeyError(f"no sharding rule for parameter {name!r}")


def spec_for(name: str, shape: tuple, mesh: Mapping[str, int]) -> P:
    """PartitionSpec (torch layout) of one canonical tensor on a mesh of the given axis sizes.

    An axis that does not divide its dimension is dropped (that dimension is then replicated)."""
    rule = rule_for(name)
    if len(rule) != len(shape):
        raise ValueError(f"rule {rule} for {name!r} has rank {len(rule)}, the tensor {tuple(shape)}")
    out = []
    for dim, ax in zip(shape, rule):
        out.append(ax if ax is not None and dim % mesh.get(ax, 1) == 0 else None)
    return P(*out)


def to_flax_layout(spec: P, layout: str) -> P:
    """Torch-layout spec -> the spec of the Flax variable: "T" transposes a 2-D kernel, "E" swaps the
    last two axes of stacked experts, "id" keeps it."""
    s = tuple(spec)
    if layout == "T":
        return P(*s[::-1])
    if layout == "E":
        return P(*s[:-2], s[-1], s[-2])
    return P(*s)


def spec_table(cfg: ModelConfig, mesh: Mapping[str, int]) -> dict[str, P]:
    """{canonical name: torch-layout PartitionSpec} for every tensor of the model."""
    from dsv3.names import canonical_shapes

    sizes = parse_mesh(mesh)
    return {name: spec_for(name, shape, sizes) for name, shape in canonical_shapes(cfg).items()}


def shard_factor(spec: P, mesh: Mapping[str, int]) -> int:
    """Into how many pieces a spec splits its tensor."""
    f = 1
    for ax in spec:
        for a in ((ax,) if isinstance(ax, str) else (ax or ())):
            f *= mesh.get(a, 1)
    return f


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, dtype_bytes: int = 4) -> dict:
    """Estimate of the activations one token keeps for the backward pass (no rematerialisation).

    Per layer: the inputs of every matmul and norm, the attention probabilities (H x seq_len values
    per query token, the only term that grows with the sequence), the SwiGLU intermediates
    (dense: 3F; MoE: K routed experts of 3F each plus the shared experts, their K inputs of D and the
    router's fp32 scores E); plus the final norm, the logits (fp32) and one more layer per MTP
    depth. With tokens split over every mesh axis, each device holds this for each of its tokens.

    Returns {"total", "attention_probs"} in bytes; the second is the part a fused (flash) attention
    would not keep."""
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    Q = cfg.q_lora_rank or 0
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    attn = (2 * D                                   # attn_norm in/out
            + (2 * Q if Q else 0)                   # q_a out, q_norm out
            + H * qk                                # q
            + (C + R) + C                           # kv_a out, kv_norm out
            + H * (cfg.qk_nope_head_dim + v)        # k_nope, v
            + H * qk                                # k with rope
            + 2 * H * seq_len                       # scores and probabilities
            + H * v)                                # attention output (wo input)
    dense_ffn = 2 * D + 3 * cfg.intermediate_size
    K, F, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
    shared = cfg.n_shared_experts * F
    moe_ffn = 2 * D + K * D + 3 * K * F + 3 * shared + K * D + 2 * E  # norm, gathered rows, SwiGLU, outputs
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    layers = n_dense * (attn + dense_ffn) + n_moe * (attn + moe_ffn)
    mtp = cfg.num_nextn_predict_layers * (attn + moe_ffn + 5 * D + V)
    head = D + V
    total = (layers + mtp + head) * dtype_bytes + (V * (1 + cfg.num_nextn_predict_layers)) * (4 - dtype_bytes)
    n_attn = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return {"total": int(total), "attention_probs": int(n_attn * 2 * H * seq_len * dtype_bytes)}


# --------------------------------------------------------- placing a model
def _flat_vars(obj) -> list:
    from flax import nnx

    return [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(obj))]


def _torch_shape(shape: tuple, layout: str) -> tuple:
    if layout == "T":
        return shape[::-1]
    if layout == "E":
        return shape[:-2] + shape[-2:][::-1]
    return shape


def model_specs(model, mesh: Mapping[str, int]) -> dict[tuple, P]:
    """{state path: Flax-layout PartitionSpec} for every variable of a DeepSeekV3, concrete or
    abstract (``DeepSeekV3.abstract``): canonical variables per RULES, anything else replicated. A
    scanned model's layer stacks take the rule of their layers with the leading layer axis unsplit."""
    sizes = parse_mesh(mesh)
    by_id = {}
    for name, var, layout, row in model._slots():
        shape = tuple(var.get_value().shape)
        if row is None:
            by_id[id(var)] = to_flax_layout(spec_for(name, _torch_shape(shape, layout), sizes), layout)
        elif id(var) not in by_id:  # a layer stack (scan_layers): one layer's rule, the layer axis unsplit
            by_id[id(var)] = P(None, *to_flax_layout(spec_for(name, _torch_shape(shape[1:], layout), sizes),
                                                      layout))
    return {path: by_id.get(id(var), P()) for path, var in _flat_vars(model)}


def optimizer_specs(optimizer, model, mesh: Mapping[str, int]) -> dict[tuple, P]:
    """{state path: PartitionSpec} for an nnx.Optimizer's state: a leaf whose path ends with a
    parameter's path and has its shape (Adam mu, nu) follows that parameter; the rest (step
    counts) is replicated."""
    params = model_specs(model, mesh)
    shapes = {path: tuple(var.get_value().shape) for path, var in _flat_vars(model)}
    out = {}
    for path, var in _flat_vars(optimizer):
        spec = P()
        for i in range(len(path)):
            if path[i:] in params and shapes[path[i:]] == tuple(np.shape(var.get_value())):
                spec = params[path[i:]]
                break
        out[path] = spec
    return out


def init_distributed() -> tuple[int, int]:
    """Join a multi-process JAX job described by JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (``dsv3 train --coordinator/--num-processes/--process-id`` set
    them); returns (process index, process count). Without them nothing is initialised: (0, 1).

    Call before the first jax computation. On CPU the processes exchange data through gloo
    (``jax_cpu_collectives_implementation``), so 2 processes x 4 simulated devices run on one machine."""
    import os

    if "JAX_NUM_PROCESSES" not in os.environ or jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by the CPU backend
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    return jax.process_index(), jax.process_count()


def global_array(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same whole value in every process) as a global array of ``sharding``; each process
    transfers only the pieces its own devices hold (several processes: ``jax.make_array_from_callback``)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place(obj, specs: Mapping[tuple, P], mesh: jax.sharding.Mesh) -> None:
    for path, var in _flat_vars(obj):
        var.set_value(global_array(var.get_value(), NamedSharding(mesh, specs[path])))


def shard_model(model, mesh: jax.sharding.Mesh) -> None:
    """Move every variable of ``model`` onto ``mesh`` per RULES (others replicated), in place."""
    _place(model, model_specs(model, mesh_shape(mesh)), mesh)


def shard_optimizer(optimizer, model, mesh: jax.sharding.Mesh) -> None:
    """Move an nnx.Optimizer's state onto ``mesh``: moments as their parameters, the rest replicated."""
    _place(optimizer, optimizer_specs(optimizer, model, mesh_shape(mesh)), mesh)


def planned_bytes(model, optimizer, mesh: Mapping[str, int]) -> dict:
    """Per-device bytes of the model's variables and the optimizer's state under the rules, from
    shapes and dtypes only (works on ``DeepSeekV3.abstract`` and ``nnx.eval_shape`` objects; nothing
    is allocated). Every spec divides its dimension, so each device holds the same amount."""
    sizes = parse_mesh(mesh)

    def total(obj, specs):
        n = 0
        for path, var in _flat_vars(obj):
            v = var.get_value()
            n += math.prod(v.shape) * np.dtype(v.dtype).itemsize // shard_factor(specs[path], sizes)
        return n

    params = total(model, model_specs(model, sizes))
    opt = total(optimizer, optimizer_specs(optimizer, model, sizes)) if optimizer is not None else 0
    return {"params": params, "optimizer": opt, "total": params + opt}


def abstract_plan(cfg: ModelConfig, mesh: str | Mapping[str, int], tcfg=None, seq_len: int = 4096) -> dict:
    """``planned_bytes`` of the fp32 model and its AdamW state built with ``nnx.eval_shape`` (no
    allocation), plus the activation estimate per token; what ``dsv3 info --mesh`` prints."""
    from flax import nnx

    from dsv3.training import TrainConfig
    from dsv3_jax.model import DeepSeekV3
    from dsv3_jax.train import make_tx

    tcfg = tcfg or TrainConfig()
    model = DeepSeekV3.abstract(cfg)
    opt = nnx.eval_shape(lambda m: nnx.Optimizer(m, make_tx(tcfg), wrt=nnx.Param), model)
    plan = planned_bytes(model, opt, mesh)
    act = activation_bytes_per_token(cfg, seq_len)
    plan["activations_per_token"] = act["total"]
    plan["attention_probs_per_token"] = act["attention_probs"]
    plan["seq_len"] = seq_len
    plan["mesh"] = format_mesh(parse_mesh(mesh))
    plan["devices"] = mesh_size(parse_mesh(mesh))
    return plan


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Split dimension ``batch_dim`` over ("data", "fsdp", "expert"); the rest replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def measured_bytes(tree) -> dict:
    """{device: bytes} held by the addressable shards of every jax.Array leaf of ``tree``."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for s in leaf.addressable_shards:
                out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out
