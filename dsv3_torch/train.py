"""PyTorch training backend for `dsv3 train --framework torch` (driver: dsv3.training).

One optimizer step (docs/reference.md §8): every micro-batch's loss / k is
back-propagated (gradients accumulate to the mean over the step's sequences),
the expert counts of all micro-batches are summed, the global gradient norm is
clipped, AdamW steps at the schedule's learning rate (weight decay only on
matrices: not on norms, and the router bias is a buffer the optimizer never
sees), and then ``update_router_bias`` runs ONCE with the summed counts.
When the loss or the gradient norm is not finite, neither the optimizer nor
the bias update runs: weights, moments and biases stay as they were, and the
non-finite values are returned for the driver to report.
Evaluation runs under ``torch.no_grad`` and never touches a bias.

``dtype="bfloat16"`` keeps fp32 master weights and optimizer state and runs the
forward and backward under CPU autocast to bf16.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Sequence

import numpy as np
import torch

from dsv3.config import ModelConfig
from dsv3.train_config import TrainConfig, check_optimizer_args, decays
from dsv3_torch.layers import from_numpy, to_numpy
from dsv3_torch.model import DeepSeekV3


def adamw(groups, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """The backends' optimizer: ``torch.optim.AdamW`` with its fused kernel (one pass over each parameter's
    weights, moments and gradient instead of a dozen tensor ops per parameter). Per-group ``weight_decay``
    comes with ``groups``. On the bench's 2-core CPU a peer-small step's AdamW took 6.8 ms against 20.7 ms
    for the per-tensor loop; it rounds a few operations differently (weights within 3e-8 after a step)."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


_NORM_CHUNK = 1 << 16


def sum_of_squares(tensors) -> torch.Tensor:
    """The sum of the squares of every element of ``tensors``, in fp32, as a 0-d tensor: each tensor's
    64 Ki-element chunks dotted with themselves as one batched product ([n, 1, c] @ [n, c, 1]), the
    chunks' sums then added. ``(g ** 2).sum()`` writes a temporary the size of each tensor first; this
    reads each once. Measured on the medium preset's 446 M gradients (2-core Intel Xeon VM): 77-85 ms
    against 176-610 ms, both within 4e-8 of the fp64 sum; ``torch.dot`` over whole tensors was as fast
    but 1.1e-5 off (docs/bench/README.md, "Measured choices in the code")."""
    parts = []
    for t in tensors:
        flat = t.detach().float().reshape(-1)
        n = flat.numel() - flat.numel() % _NORM_CHUNK
        if n:
            rows = flat[:n].view(-1, 1, _NORM_CHUNK)
            parts.append(torch.bmm(rows, rows.mT).reshape(-1))
        if n < flat.numel():
            rest = flat[n:]
            parts.append(torch.dot(rest, rest).reshape(1))
    return torch.cat(parts).sum() if parts else torch.zeros((), dtype=torch.float32)


def compile_loss(fn):
    """torch.compile of the loss as one graph, forward and backward.

    Each MoE layer reads its per-expert row counts to the host (``split`` takes ints). Without
    ``capture_scalar_outputs`` that read ends the graph, and the MTP loop around it leaves the
    whole loss to eager apart from the pieces between the reads; the counts then recompile their
    graphs until automatic dynamic shapes take over. With it the counts are data-dependent symbols
    in the graph (``dsv3_torch.moe.group_sizes``): one graph, compiled once."""
    compiled = torch.compile(fn)

    def loss_fn(*args, **kwargs):
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return compiled(*args, **kwargs)

    return loss_fn


class TorchBackend:
    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, model: DeepSeekV3 | None = None):
        self.model_cfg, self.tcfg = cfg, tcfg
        if model is None:
            torch.manual_seed(tcfg.seed)
            model = DeepSeekV3(cfg, dtype=torch.float32)
        self.model = model
        self.model.train()
        self.names = {p: n for n, p in model.named_parameters()}
        decay = [p for n, p in model.named_parameters() if decays(n, p.ndim)]
        no_decay = [p for n, p in model.named_parameters() if not decays(n, p.ndim)]
        check_optimizer_args(tcfg.lr, tcfg.beta1, tcfg.beta2, tcfg.eps, tcfg.weight_decay, tcfg.grad_clip)
        groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = adamw(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
        self.loss_fn = model.compute_loss
        if tcfg.compile:
            self.loss_fn = compile_loss(model.compute_loss)

    def _autocast(self):
        if self.tcfg.dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------- train
    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float) -> dict:
        model, k = self.model, len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        counts = None
        sums = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0, "mtp_depth_loss": 0.0}
        for x, y in micro_batches:
            with self._autocast():
                out = self.loss_fn(torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64)))
            (out.loss / k).backward()
            c = out.counts.detach()
            counts = c.clone() if counts is None else counts + c
            sums["loss"] += float(out.loss.detach()) / k
            sums["main_loss"] += float(out.main_loss.detach()) / k
            sums["mtp_loss"] += float(out.mtp_loss.detach()) / k
            sums["balance_loss"] += float(out.balance_loss.detach()) / k
            if out.mtp_losses.numel():
                sums["mtp_depth_loss"] += float(out.mtp_losses.detach().mean()) / k
        counts, sums = self._reduce_counts(counts), self._reduce_metrics(sums)
        grad_norm = self._clip()
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # the step is not applied
        else:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            model.update_router_bias(counts, gamma=self.model_cfg.bias_update_speed)
        if not self.model.mtp:
            sums.pop("mtp_depth_loss")
        return {**sums, "grad_norm": grad_norm, "counts": counts.cpu().numpy()}

    def _reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """The step's expert counts over every process holding distinct tokens (one process: as is)."""
        return counts

    def _reduce_metrics(self, sums: dict) -> dict:
        """The step's mean losses over every process (one process: as is)."""
        return sums

    @torch.no_grad()
    def _clip(self) -> float:
        """Global L2 norm of all gradients; when it is at least tcfg.grad_clip, the step's AdamW divides
        every gradient by norm / grad_clip in its own pass (the fused kernel's ``grad_scale``, which
        also leaves the clipped gradients in ``.grad``) instead of two passes of ``div_`` and ``mul_``
        over them. optax's g / norm * grad_clip rounds the same for a power-of-two grad_clip (the
        default 1.0), within an ulp otherwise."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum_of_squares(grads))
        c = self.tcfg.grad_clip
        clip = c > 0 and math.isfinite(float(norm)) and float(norm) >= c
        self.optimizer.grad_scale = norm / c if clip else None
        return float(norm)

    @torch.no_grad()
    def eval_step(self, input_ids: np.ndarray, labels: np.ndarray) -> dict:
        with self._autocast():
            out = self.model.compute_loss(torch.from_numpy(np.asarray(input_ids, np.int64)),
                                          torch.from_numpy(np.asarray(labels, np.int64)))
        res = {"main_loss": float(out.main_loss)}
        if out.mtp_losses.numel():
            res["mtp_depth_loss"] = float(out.mtp_losses.mean())
        return res

    # ------------------------------------------------------------ state
    def canonical_state(self) -> dict[str, np.ndarray]:
        return self.model.canonical_state()

    def load_canonical_state(self, state: dict[str, np.ndarray]) -> None:
        self.model.load_canonical_state(state)

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW moments and step count per parameter, keyed by canonical name."""
        out = {}
        for p, st in self.optimizer.state.items():
            name = self.names[p]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{name}.{key}"] = to_numpy(torch.as_tensor(st[key]))
        return out

    def load_optimizer_state(self, tensors: dict[str, np.ndarray]) -> None:
        self.optimizer.state.clear()
        expected = set()
        for name, p in self.model.named_parameters():
            keys = [f"{name}.{k}" for k in ("exp_avg", "exp_avg_sq", "step")]
            expected.update(keys)
            if not all(k in tensors for k in keys):
                missing = [k for k in keys if k not in tensors]
                raise ValueError(f"optimizer state is missing {missing}")
            st = {k.rsplit(".", 1)[1]: from_numpy(tensors[k]) for k in keys}
            for k in ("exp_avg", "exp_avg_sq"):
                if tuple(st[k].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {name}.{k} has shape {tuple(st[k].shape)}, "
                                     f"parameter has {tuple(p.shape)}")
            st["step"] = st["step"].reshape(()).to(torch.float32)
            self.optimizer.state[p] = st
        extra = sorted(set(tensors) - expected)
        if extra:
            raise ValueError(f"optimizer state has unexpected entries {extra[:10]}")


def make_backend(cfg: ModelConfig, tcfg: TrainConfig) -> TorchBackend:
    """TorchBackend; under torchrun or with a mesh, the sharded one (dsv3_torch.dist_train)."""
    if getattr(tcfg, "mesh", None) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dsv3_torch.dist_train import ShardedTorchBackend

        return ShardedTorchBackend(cfg, tcfg)
    return TorchBackend(cfg, tcfg)
