"""The JAX training backend on a mesh, as the run directory sees it: `dsv3 train --mesh ...`.

``ShardedJaxBackend`` is ``JaxBackend(mesh=...)`` (the state placed by ``dsv3_jax.sharding``, one GSPMD step)
whose checkpoints keep the state sharded: each ``step_NNNNNN/`` holds ``orbax/`` (the model and AdamW
state, every shard written by the process that owns it; ``dsv3_jax.dist_checkpoint``), the HF export
(config.json + safetensors, each tensor gathered once) and train_state.json. ``--resume`` reads
``orbax/`` into the current mesh, which may differ from the one that wrote it.
"""

from __future__ import annotations

import os

import numpy as np

from dsv3_jax import sharding
from dsv3_jax.dist_checkpoint import load_sharded, save_sharded
from dsv3_jax.train import JaxBackend

SHARDED_DIR = "orbax"


class ShardedJaxBackend(JaxBackend):
    """A JaxBackend on ``sharding.make_mesh(tcfg.mesh)`` with orbax checkpoints."""

    def __init__(self, cfg, tcfg, model=None):
        super().__init__(cfg, tcfg, model, mesh=sharding.make_mesh(tcfg.mesh))

    def write_checkpoint(self, out: str, step: int, meta: dict, keep: int) -> str:
        """One checkpoint of the run directory, written atomically (``dsv3.rundir.write_checkpoint``)."""
        from dsv3.rundir import save_train_state, write_checkpoint

        def write_into(d: str) -> None:
            save_sharded(os.path.join(d, SHARDED_DIR), self.model, self.optimizer)
            self.save_pretrained(d)
            save_train_state(d, {}, {**meta, "mesh": sharding.format_mesh(sharding.mesh_shape(self.mesh)),
                                     "optimizer": SHARDED_DIR})

        return write_checkpoint(out, step, write_into, keep=keep)

    def restore_checkpoint(self, directory: str) -> None:
        """Model and AdamW state from a checkpoint's orbax/ (written on any mesh)."""
        path = os.path.join(directory, SHARDED_DIR)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{directory!r} has no {SHARDED_DIR}/ sharded state: it was not written by a "
                                    f"--mesh run (resume it without --mesh)")
        load_sharded(path, self.model, self.optimizer)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("a sharded run keeps its optimizer state in the orbax checkpoint (save_sharded)")

    def load_optimizer_state(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError("a sharded run restores its optimizer state from orbax (load_sharded)")
