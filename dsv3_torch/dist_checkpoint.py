"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), resharded on load.

A DCP directory holds the model and AdamW state of a run as each rank's shards
plus a global index (``.metadata``). ``load_dcp`` reads it into any layout: the
same mesh, another mesh with fewer or more ranks, or one process without a
process group (plain tensors) -- DCP reads the pieces of every saved shard that
overlap the tensors asked for.

``full_model_state`` / ``full_optimizer_state`` gather the whole state once
(rank 0 keeps it, on CPU): the HF safetensors export of a sharded model and
the tests' bit-exact comparisons use them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)


def save_dcp(directory: str | os.PathLike, model: torch.nn.Module, optimizer=None) -> None:
    """Every rank writes its shards of the model (and optimizer) state into ``directory`` (collective)."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=os.fspath(directory))


def load_dcp(directory: str | os.PathLike, model: torch.nn.Module, optimizer=None) -> None:
    """Read ``directory`` into this process's shards of the model (and optimizer) (collective).

    The checkpoint may come from any mesh or number of ranks.
    """
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=os.fspath(directory))
        set_model_state_dict(model, state["model"])
        return
    msd, osd = get_state_dict(model, optimizer)  # initialises empty AdamW state (a zero-lr step)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.fspath(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} on rank 0 ({} on the other ranks); collective."""
    sd = get_model_state_dict(model, options=_full_options())
    return sd if is_writer() else {}


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """{"state": {param name: {exp_avg, exp_avg_sq, step}}, "param_groups": [...]} on rank 0; collective."""
    sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    return sd if is_writer() else {}
