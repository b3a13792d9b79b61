"""The torch training backend on a DeviceMesh: `torchrun ... -m dsv3 train --framework torch --mesh ...`.

``ShardedTorchBackend`` is ``TorchBackend`` with the model parallelised from
outside (``dsv3_torch.sharding.parallelize``: FSDP2 on every block and the
root, expert parallelism when the mesh has an ``expert`` axis). One optimizer
step is the single-process step on this rank's slice of every micro-batch:

* rank r reads only rows r*b .. (r+1)*b - 1 of each global micro-batch
  (b = rows / world; ``data_slice``) and ``train_step`` receives those rows;
* each rank's loss is the mean over its rows; FSDP averages the gradients over
  the ranks, so with equal slices the gradient is that of the global mean;
* the expert counts are summed over every rank (all-reduce) before the one
  router-bias update, so all ranks apply the same sign update;
* the gradient norm is global (``clip_grad_norm``) and the reported losses are
  averaged over the ranks: the numbers of the single-process step.

Checkpoints: ``save_sharded``/``load_sharded`` (DCP, resharded on load) and
``save_pretrained`` (HF safetensors from the full state, gathered once and
written by rank 0).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dsv3 import checkpoint as ckpt
from dsv3.config import ModelConfig
from dsv3_torch import dist_checkpoint as dck
from dsv3_torch.layers import from_numpy, to_numpy
from dsv3_torch.model import DeepSeekV3
from dsv3_torch.sharding import Mesh, clip_grad_norm, format_mesh, init_distributed, make_mesh, parallelize
from dsv3_torch.train import TorchBackend


class ShardedTorchBackend(TorchBackend):
    """TorchBackend on a Mesh; every rank of the job constructs one (collective)."""

    def __init__(self, cfg: ModelConfig, tcfg, mesh: Mesh | str | None = None,
                 model: Optional[DeepSeekV3] = None):
        if getattr(tcfg, "compile", False):
            raise ValueError("--compile is not supported with --mesh yet")
        if not isinstance(mesh, Mesh):
            init_distributed()
            mesh = make_mesh(mesh if mesh is not None else getattr(tcfg, "mesh", None))
        self.mesh = mesh
        if model is None:
            torch.manual_seed(tcfg.seed)  # every rank builds the same initial weights
            model = DeepSeekV3(cfg, dtype=torch.float32)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if mesh.mesh.device_type == "cuda"
                       else torch.device("cpu"))
        parallelize(model, mesh, torch.bfloat16 if tcfg.dtype == "bfloat16" else None)  # moves it to the device
        super().__init__(cfg, tcfg, model=model)
        compute_loss = self.model.compute_loss
        self.loss_fn = lambda x, y: compute_loss(x.to(self.device), y.to(self.device))

    def _autocast(self):
        if self.tcfg.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- data
    @property
    def is_writer(self) -> bool:
        """Rank 0 logs and writes the files every rank would write the same."""
        return dist.get_rank() == 0

    def data_slice(self, rows: int) -> tuple[int, int]:
        """(first row, rows) of this rank's slice of a global micro-batch of ``rows`` sequences."""
        W = self.mesh.world
        if rows % W:
            raise ValueError(f"a micro-batch of {rows} sequences cannot be split over {W} ranks: "
                             f"make batch_size / grad_accum a multiple of {W}")
        b = rows // W
        return self.mesh.rank * b, b

    def local_rows(self, a: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch [B, ...]."""
        lo, n = self.data_slice(np.asarray(a).shape[0])
        return np.asarray(a)[lo:lo + n]

    # ---------------------------------------------------------------- steps
    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float) -> dict:
        """One optimizer step on THIS RANK's rows of each micro-batch (``data_slice``/``local_rows``)."""
        return super().train_step(micro_batches, lr)

    def _reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Expert counts summed over every rank (all hold distinct tokens)."""
        counts = counts.clone()
        dist.all_reduce(counts)
        return counts

    def _reduce_metrics(self, sums: dict) -> dict:
        """Per-rank means -> the mean over all ranks (equal slices: the global mean)."""
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.mesh.world for k, v in zip(keys, t.tolist())}

    def _clip(self) -> float:
        return clip_grad_norm(self.model.parameters(), self.tcfg.grad_clip, self.mesh)

    @torch.no_grad()
    def eval_step(self, input_ids: np.ndarray, labels: np.ndarray) -> dict:
        W = self.mesh.world
        split = np.asarray(input_ids).shape[0] % W == 0
        if split:
            input_ids, labels = self.local_rows(np.asarray(input_ids)), self.local_rows(np.asarray(labels))
        with self._autocast():
            out = self.loss_fn(torch.from_numpy(np.asarray(input_ids, np.int64)),
                               torch.from_numpy(np.asarray(labels, np.int64)))
        res = {"main_loss": float(out.main_loss)}
        if out.mtp_losses.numel():
            res["mtp_depth_loss"] = float(out.mtp_losses.mean())
        if not split:  # every rank evaluated the whole batch
            return res
        return self._reduce_metrics(res)

    # ---------------------------------------------------------------- state
    def canonical_state(self) -> dict[str, np.ndarray]:
        """The full state on rank 0 ({} elsewhere); collective."""
        return {k: to_numpy(v) for k, v in dck.full_model_state(self.model).items()}

    def load_canonical_state(self, state: dict[str, np.ndarray]) -> None:
        """Every rank passes the same full state; each keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        ckpt.check_state(state, self.model_cfg)
        full = {k: from_numpy(v) for k, v in state.items()}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))

    def save_pretrained(self, directory: str) -> None:
        """HF safetensors + config.json from the full state, gathered once; rank 0 writes (collective)."""
        state = self.canonical_state()
        if self.is_writer:
            ckpt.save_canonical(directory, state, self.model_cfg)
        dist.barrier()

    def save_sharded(self, directory: str) -> None:
        dck.save_dcp(directory, self.model, self.optimizer)

    def load_sharded(self, directory: str) -> None:
        dck.load_dcp(directory, self.model, self.optimizer)

    # ------------------------------------------------- run-directory checkpoints
    def write_checkpoint(self, out: str, step: int, meta: dict, keep: int) -> str:
        """One checkpoint of the run directory (collective; returns its final path on every rank).

        step_NNNNNN/ holds dcp/ (every rank's shards of the model and AdamW
        state), the HF export (config.json + safetensors, gathered once and
        written by rank 0) and train_state.json (rank 0). Rank 0 names the
        temporary directory and renames it into place once every rank is done.
        """
        from dsv3.rundir import save_train_state, write_checkpoint

        def write_into(d: str) -> None:
            if self.is_writer:
                dist.broadcast_object_list([d], src=0)
            self.save_sharded(os.path.join(d, "dcp"))
            self.save_pretrained(d)
            if self.is_writer:
                save_train_state(d, {}, {**meta, "mesh": format_mesh(self.mesh.sizes), "optimizer": "dcp"})
            dist.barrier()  # every rank's shards are in d before rank 0 renames it

        if self.is_writer:
            final = write_checkpoint(out, step, write_into, keep=keep)
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            write_into(box[0])
            final = None
        box = [final]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def restore_checkpoint(self, directory: str) -> None:
        """Model and AdamW state from a checkpoint's dcp/ (written on any mesh)."""
        path = os.path.join(directory, "dcp")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{directory!r} has no dcp/ sharded state: it was not written by a "
                                    f"--mesh run (resume it without --mesh)")
        self.load_sharded(path)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("a sharded run keeps its optimizer state in the DCP checkpoint (save_sharded)")

    def load_optimizer_state(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError("a sharded run restores its optimizer state from DCP (load_sharded)")


def make_backend(cfg: ModelConfig, tcfg) -> ShardedTorchBackend:
    return ShardedTorchBackend(cfg, tcfg)
