"""Sharded checkpoints with orbax, resharded on load (the JAX side of ``dsv3_torch/dist_checkpoint.py``).

An orbax directory holds the model and AdamW state of a run as each array's shards plus orbax's
metadata; every process writes the shards it owns, so nothing is gathered on one host. ``load_sharded``
reads it into the arrays' CURRENT shardings: the same mesh, another mesh shape, or one device --
orbax reads the pieces of every saved shard that overlap each requested shard.

The HF safetensors export of a sharded model (``DeepSeekV3.save_pretrained``) gathers each tensor
once; the run directory of a sharded run holds both (``JaxBackend.write_checkpoint``).
"""

from __future__ import annotations

import os

import jax
from flax import nnx


def _state(model: nnx.Module, optimizer: nnx.Optimizer | None) -> dict:
    """The saved tree: {"model": its state, "optim": the optimizer's (when given)}."""
    return {"model": nnx.state(model)} | ({} if optimizer is None else {"optim": nnx.state(optimizer)})


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_sharded(directory: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
    """Write the model's (and optimizer's) state into ``directory`` (which must not exist), each
    process its own shards; returns once the files are complete."""
    ckpt = _checkpointer()
    ckpt.save(os.path.abspath(os.fspath(directory)), _state(model, optimizer))
    ckpt.wait_until_finished()


def load_sharded(directory: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
    """Read ``directory`` into the model (and optimizer) in place, each array in the sharding it has now
    (the checkpoint may come from any mesh or from one device); shapes and dtypes must match."""
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          _state(model, optimizer))
    restored = _checkpointer().restore(os.path.abspath(os.fspath(directory)), target)
    nnx.update(model, restored["model"])
    if optimizer is not None:
        nnx.update(optimizer, restored["optim"])
