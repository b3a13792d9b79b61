"""PyTorch at scale: a DeviceMesh (axes ``data``, ``fsdp``, ``expert``), FSDP2 and expert parallelism.

Everything here is applied to a single-process ``DeepSeekV3`` from outside;
the model files never import ``torch.distributed``.

Layout (the torchtitan layout; every rank holds distinct tokens)::

    mesh      init_device_mesh(dev, (data, fsdp, expert), ("data", "fsdp", "expert"))
    batch     split over all data * fsdp * expert ranks (rank r reads rows r*b:(r+1)*b)
    dense     fully_shard over "shard" = flatten(fsdp, expert); replicated over "data" (HSDP)
    experts   E split over "expert" (DTensor Shard(0)); each rank's E/ep experts
              fully_shard over "fsdp" (replicated over "data"); Shard(1) when the
              fsdp degree exceeds the local experts (torchtitan's rule)
    tokens    exchanged over "expert" with all_to_all_single (autograd), uneven
              splits, dropless: ExpertParallelDispatcher
    router    the bias is a buffer (never sharded); the expert counts are summed
              over every rank before the sign update, so all ranks apply the same update

FSDP averages gradients over the ranks of its mesh; an expert's gradient already
sums the contributions of every rank in its expert group (the all-to-all's
backward brings them), so the experts' FSDP divides by the whole world size.

Backends: nccl when CUDA is available, gloo on CPU (``backend_for``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dsv3.mesh import AXES, format_mesh, parse_mesh  # noqa: F401 (re-exported)
from dsv3_torch.train import sum_of_squares


# ------------------------------------------------------------------ the mesh
def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

def backend_for(device: str) -> str:
    """The collective backend of a device type: nccl on CUDA, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"

def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Join (or create) the default process group from torchrun's environment; returns (rank, world).

    Without torchrun's variables (a plain ``python`` run) nothing is initialised: (0, 1).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    import datetime

    dev = device_type()
    if dev == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(dev), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()

@dataclass
class Mesh:
    """The job's DeviceMesh and the sub-meshes the layout uses."""

    mesh: "torch.distributed.device_mesh.DeviceMesh"
    sizes: dict
    shard: "torch.distributed.device_mesh.DeviceMesh"  # flatten(fsdp, expert), kept (slicing it is deprecated)

    @property
    def world(self) -> int:
        return self.sizes["data"] * self.sizes["fsdp"] * self.sizes["expert"]

    @property
    def rank(self) -> int:
        """The rank's index among the ranks holding distinct tokens (= its global rank)."""
        return dist.get_rank()

    @property
    def ep(self) -> int:
        return self.sizes["expert"]

    @property
    def shard_size(self) -> int:
        return self.sizes["fsdp"] * self.sizes["expert"]

    def dense_mesh(self):
        """The FSDP mesh of every parameter but the routed experts: (data, shard) or (shard)."""
        return self.mesh["data", "shard"] if self.sizes["data"] > 1 else self.shard

    def expert_fsdp_mesh(self):
        """The FSDP mesh of the routed experts under expert parallelism: (data, fsdp) or (fsdp)."""
        return self.mesh["data", "fsdp"] if self.sizes["data"] > 1 else self.mesh["fsdp"]

    def expert_mesh(self):
        return self.mesh["expert"]

    def shard_group(self):
        """The ranks that together hold one copy of every parameter (flattened fsdp x expert)."""
        return self.shard.get_group()

def make_mesh(spec: Optional[str] | dict) -> Mesh:
    """The job's Mesh from a spec string (the default process group must exist)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("make_mesh needs a process group: launch with torchrun (see init_distributed)")
    world = dist.get_world_size()
    sizes = dict(spec) if isinstance(spec, dict) else parse_mesh(spec, world)
    parse_mesh(format_mesh(sizes), world)  # validates the product
    mesh = init_device_mesh(device_type(), tuple(sizes[a] for a in AXES), mesh_dim_names=AXES)
    shard = mesh["fsdp", "expert"]._flatten("shard")
    return Mesh(mesh, sizes, shard)

# --------------------------------------------------------------------- FSDP2
def _mp_policy(dtype: Optional[torch.dtype]):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype is None or dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

def _moe_layers(model) -> list:
    from dsv3_torch.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]

def parallelize(model: nn.Module, mesh: Mesh, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Apply expert parallelism (when mesh.ep > 1) and FSDP2 to a DeepSeekV3, in place.

    Every rank must hold the same initial weights (same seed, or loaded from
    the same file). ``param_dtype`` (e.g. torch.bfloat16): FSDP's mixed
    precision (all-gathers and compute in that dtype, gradients reduced in
    fp32); the routers keep fp32 weights (docs/reference.md §4.2) through their own
    fp32 policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dense = mesh.dense_mesh()
    mp = _mp_policy(param_dtype)
    if mesh.ep > 1:
        apply_expert_parallel(model, mesh, mp)
    if param_dtype is not None and param_dtype != torch.float32:
        for moe in _moe_layers(model):
            fully_shard(moe.gate, mesh=dense, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    for layer in model.layers:
        fully_shard(layer, mesh=dense, mp_policy=mp)
    for mod in model.mtp:
        # Only the MTP depth's block: its final norm is called from the root's
        # code (model.forward_train), outside the depth's own forward.
        fully_shard(mod.block, mesh=dense, mp_policy=mp)
    fully_shard(model, mesh=dense, mp_policy=mp)
    # The training loss is a method, not forward: give it the root's unshard/reshard hooks.
    register_fsdp_forward_method(model, "compute_loss")
    return model

def apply_expert_parallel(model: nn.Module, mesh: Mesh, mp=None) -> None:
    """Split every MoE's routed experts over ``expert`` and install the expert-parallel dispatcher."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from dsv3_torch.expert_parallel import ExpertParallelDispatcher, ExpertParallelExperts

    ep_mesh = mesh.expert_mesh()
    for moe in _moe_layers(model):
        E = moe.experts.w1.shape[0]
        if E % mesh.ep:
            raise ValueError(f"{E} routed experts cannot be split over expert={mesh.ep}")
        ex = moe.experts
        for name, p in list(ex.named_parameters(recurse=False)):
            dt = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
            setattr(ex, name, nn.Parameter(dt, requires_grad=p.requires_grad))
        ex.__class__ = ExpertParallelExperts.subclass_of(type(ex))
        moe.dispatcher = ExpertParallelDispatcher.from_local(moe.dispatcher, ep_mesh.get_group())
        local = E // mesh.ep
        fs = mesh.sizes["fsdp"]
        fully_shard(ex, mesh=mesh.expert_fsdp_mesh(), mp_policy=mp if mp is not None else _mp_policy(None),
                    shard_placement_fn=(lambda p: Shard(1)) if fs > local else None)
        # The all-to-all's backward already summed every expert-group rank's tokens into
        # this rank's expert gradients: divide by the world, not by the FSDP group.
        ex.set_gradient_divide_factor(float(mesh.world))
        if mesh.mesh.device_type == "cpu" and mesh.sizes["data"] * fs > 1:
            # gloo has no PREMUL_SUM: sum, then scale. (On a one-rank FSDP mesh there is no
            # collective, and forcing it there scaled the gradients twice: measured, torch 2.13.)
            ex.set_force_sum_reduction_for_comms(True)

# ---------------------------------------------------------------- gradients
def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t

@torch.no_grad()
def clip_grad_norm(params, max_norm: float, mesh: Mesh) -> float:
    """Global L2 norm of the gradients of FSDP/EP-sharded parameters; scaled to max_norm when above it.

    Each rank's local shards are disjoint within the "shard" group (dense
    parameters: FSDP shards; experts: expert x fsdp shards) and replicated over
    "data", so the squared norm is one all-reduce over "shard".
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [_local(g) for g in grads]
    sq = sum_of_squares(local)
    if mesh.shard_size > 1:
        dist.all_reduce(sq, group=mesh.shard_group())
    norm = torch.sqrt(sq)
    if max_norm > 0 and float(norm) >= max_norm:
        for g in local:
            g.div_(norm).mul_(max_norm)
    return float(norm)
