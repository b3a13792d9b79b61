"""The JAX training backend on a mesh, as the run directory sees it: `dsv3 train --mesh ...`.

``ShardedJaxBackend`` is ``JaxBackend(mesh=...)`` (the state placed by ``dsv3_jax.sharding``, one GSPMD step)
whose checkpoints keep the state sharded: each ``step_NNNNNN/`` holds ``orbax/`` (the model and AdamW
state, every shard written by the process that owns it; ``dsv3_jax.dist_checkpoint``), the HF export
(config.json + safetensors, each tensor gathered once) and train_state.json. ``--resume`` reads
``orbax/`` into the current mesh, which may differ from the one that wrote it.

Several processes (``dsv3 train --coordinator HOST:PORT --num-processes N --process-id I``, one command per
process; ``dsv3_jax.sharding.init_distributed``): the mesh spans every process's devices, each process
places only its own pieces of the state and of every batch, and runs the same step; process 0 alone logs
and writes the run directory's files, every process writes its orbax shards.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dsv3_jax import sharding
from dsv3_jax.dist_checkpoint import load_sharded, save_sharded
from dsv3_jax.train import JaxBackend

SHARDED_DIR = "orbax"


class ShardedJaxBackend(JaxBackend):
    """A JaxBackend on ``sharding.make_mesh(tcfg.mesh)`` (over every process) with orbax checkpoints."""

    def __init__(self, cfg, tcfg, model=None):
        sharding.init_distributed()  # before the first jax computation
        super().__init__(cfg, tcfg, model, mesh=sharding.make_mesh(tcfg.mesh))

    @property
    def is_writer(self) -> bool:
        return jax.process_index() == 0

    def canonical_state(self) -> dict[str, np.ndarray]:
        if jax.process_count() == 1:
            return super().canonical_state()
        from jax.experimental import multihost_utils

        return self.model.canonical_state(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)))

    def save_pretrained(self, directory: str) -> None:
        """The HF export, gathered (collective); process 0 writes it."""
        from dsv3.checkpoint import save_canonical

        state = self.canonical_state()
        if self.is_writer:
            save_canonical(directory, state, self.model_cfg)

    def write_checkpoint(self, out: str, step: int, meta: dict, keep: int) -> str:
        """One checkpoint of the run directory (collective; returns its final path on every process).
        Process 0 names the temporary directory (``dsv3.rundir.write_checkpoint``) and renames it into
        place once every process has written its shards."""
        from dsv3.rundir import save_train_state, write_checkpoint

        def write_into(d: str) -> None:
            d = _from_process_0(d)
            save_sharded(os.path.join(d, SHARDED_DIR), self.model, self.optimizer)
            self.save_pretrained(d)
            if self.is_writer:
                save_train_state(d, {}, {**meta, "mesh": sharding.format_mesh(sharding.mesh_shape(self.mesh)),
                                         "optimizer": SHARDED_DIR})
            _barrier("checkpoint written")

        final = write_checkpoint(out, step, write_into, keep=keep) if self.is_writer else write_into(None)
        return _from_process_0(final)

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


def _from_process_0(text):
    """Process 0's string (a path), on every process."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    buf = np.zeros(4096, np.uint8)
    if jax.process_index() == 0:
        raw = text.encode()
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out[out != 0]).decode()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
