"""The multi-process checks of tests/torch/test_torch_distributed.py, run under torchrun (gloo on CPU).

    python -m torch.distributed.run --nproc-per-node 4 tests/torch/dist_job.py OUT_DIR train,ep,accum [restore,cli]
    python -m torch.distributed.run --nproc-per-node 2 tests/torch/dist_job.py OUT_DIR restore,cli

Rank 0 computes the single-process references, gathers the sharded results and
writes OUT_DIR/<check>.json; the test process asserts on them. Every check of
one list shares that list's default process group. A second list runs on 2
ranks: after the first list, the 4-rank process group is destroyed, ranks 2 and
3 exit, and ranks 0 and 1 form a new 2-rank default process group (a fresh
rendezvous, with the environment a 2-process torchrun gives them) -- the
checks of a 2-process job without starting and importing 2 more processes.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from dsv3.config import ModelConfig
from dsv3.train_config import TrainConfig, lr_at
from dsv3_torch import dist_checkpoint as dck
from dsv3_torch.dist_train import ShardedTorchBackend
from dsv3_torch.model import DeepSeekV3
from dsv3_torch.sharding import init_distributed, make_mesh
from dsv3_torch.train import TorchBackend

MESHES = ("data=4", "fsdp=4", "fsdp=2,expert=2", "expert=4")
STEPS = 20
SAVE_AT = 15  # the DCP checkpoint is taken after this step; a restored run replays the last 5
DCP_MESH = "fsdp=2,expert=2"  # the mesh that saves the DCP checkpoint


def tiny() -> ModelConfig:
    """tiny with one (dense) layer and the MTP block (a MoE layer): every kind of parameter and module
    the layout shards (dense layer, routed experts under expert parallelism, router, shared experts,
    the MTP block, the root), one block of each kind."""
    return ModelConfig.preset("tiny").replace(num_hidden_layers=1, bias_update_speed=0.01)


def make_model(cfg: ModelConfig, seed: int = 0) -> DeepSeekV3:
    """The same initial weights on every rank; router weights N(0, 0.5) so that the affinities are
    spread apart and no top-k selection is a near-tie that fp32 rounding could flip."""
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg, dtype=torch.float32)
    with torch.no_grad():
        for r in model.routers():
            r.weight.normal_(0.0, 0.5)
    return model


def tcfg(**kw) -> TrainConfig:
    base = dict(framework="torch", preset="tiny", batch_size=8, seq_len=16, grad_accum=1, lr=1e-3,
                warmup_steps=2, steps=STEPS, seed=0)
    return TrainConfig(**{**base, **kw})


def batches(cfg: ModelConfig, n: int, rows: int, T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, cfg.vocab_size, size=(rows, T + 1))
        out.append((x[:, :-1], x[:, 1:]))
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over one tensor (0 for equal tensors)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(np.linalg.norm(a - b))
    return d / max(float(np.linalg.norm(b)), 1e-30) if d else 0.0


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| over one tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def model_state(backend) -> dict[str, np.ndarray]:
    sd = dck.full_model_state(backend.model) if dist.is_initialized() else backend.model.state_dict()
    return {k: v.detach().float().numpy().copy() for k, v in sd.items()}


def grads(backend) -> dict[str, np.ndarray]:
    """{parameter name: full gradient} (rank 0; collective on a mesh)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in backend.model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[n] = g.detach().float().numpy().copy()
    return out


def optim_state(backend) -> dict[str, np.ndarray]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = (dck.full_optimizer_state(backend.model, backend.optimizer) if dist.is_initialized()
          else get_optimizer_state_dict(backend.model, backend.optimizer))
    return {f"{n}.{k}": torch.as_tensor(v).float().numpy().copy()
            for n, st in sd.get("state", {}).items() for k, v in st.items()}


def run(backend, data, tc: TrainConfig, start: int = 0, stop: int = STEPS, on_step=None) -> list[float]:
    losses = []
    for step in range(start, stop):
        x, y = data[step]
        if isinstance(backend, ShardedTorchBackend):  # this rank's rows
            x, y = backend.local_rows(x), backend.local_rows(y)
        res = backend.train_step([(x, y)], lr_at(step, tc))
        losses.append(res["loss"])
        if on_step is not None:
            on_step(step + 1)
    return losses


def save_npz(path: str, d: dict) -> None:
    np.savez(path, **{k.replace("/", "|"): v for k, v in d.items()})


# ------------------------------------------------------------------ checks
def check_train(out: str, rank: int) -> None:
    """Each mesh's 20 steps vs the single-process run; fsdp=2,expert=2 also saves DCP at SAVE_AT."""
    cfg, tc = tiny(), tcfg()
    data = batches(cfg, STEPS, tc.batch_size, tc.seq_len)
    ref = {}
    if rank == 0:
        single = TorchBackend(cfg, tc, model=make_model(cfg))
        ref["loss"] = run(single, data, tc)
        ref["state"] = model_state(single)
    results = {}
    for spec in MESHES:
        backend = ShardedTorchBackend(cfg, tc, make_mesh(spec), model=make_model(cfg))
        saved = {}

        def on_step(done, backend=backend, spec=spec):
            if spec == DCP_MESH and done == SAVE_AT:
                backend.save_sharded(os.path.join(out, "dcp"))
                saved["model"], saved["optim"] = model_state(backend), optim_state(backend)
                backend.save_pretrained(os.path.join(out, "hf"))

        losses = run(backend, data, tc, on_step=on_step)
        state = model_state(backend)
        if spec == DCP_MESH:
            # resume exact: a fresh backend on the same mesh, restored from the step-SAVE_AT checkpoint
            again = ShardedTorchBackend(cfg, tc, make_mesh(spec), model=make_model(cfg))
            again.load_sharded(os.path.join(out, "dcp"))
            resumed = run(again, data, tc, start=SAVE_AT)
            state2 = model_state(again)
        if rank == 0:
            worst = max(state, key=lambda k: rel(state[k], ref["state"][k]))
            r = {"loss": losses,
                 "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref["loss"])),
                 "bias_equal": all(np.array_equal(state[k], ref["state"][k]) for k in state if k.endswith("gate.bias")),
                 "biases_changed": any(np.abs(ref["state"][k]).max() > 0 for k in state if k.endswith("gate.bias")),
                 "param_rel": rel(state[worst], ref["state"][worst]), "worst": worst,
                 "param_max_rel": max(max_rel(state[k], ref["state"][k]) for k in state),
                 "keys_equal": sorted(state) == sorted(ref["state"])}
            if spec == DCP_MESH:
                r["resumed_equal"] = resumed == losses[SAVE_AT:]
                r["resumed_state_equal"] = all(np.array_equal(state2[k], state[k]) for k in state)
                save_npz(os.path.join(out, "saved_model.npz"), saved["model"])
                save_npz(os.path.join(out, "saved_optim.npz"), saved["optim"])
            results[spec] = r
            print(f"[{spec}] loss rel {r['loss_rel']:.2e}, worst param {worst} rel {r['param_rel']:.2e} "
                  f"(max-abs {r['param_max_rel']:.2e}), "
                  f"biases equal {r['bias_equal']}", flush=True)
        dist.barrier()
    if rank == 0:
        results["ref_loss"] = ref["loss"]
        with open(os.path.join(out, "train.json"), "w") as f:
            json.dump(results, f, indent=1)


def check_ep(out: str, rank: int) -> None:
    """The expert-parallel MoE layer (with its FSDP) vs the single-process layer, on skewed routing.

    Cases: every token routed to experts 0, 1, 2 only (the ranks holding experts 4-7 receive
    nothing: zero-size splits, zero-row experts), a mild skew towards expert 0, and no bias.
    The loss is the mean over ranks of sum(out * G), G fixed: on one process the same mean
    over the global batch's slices."""
    from torch.distributed.tensor import DTensor

    from dsv3_torch.moe import MoE
    from dsv3_torch.sharding import apply_expert_parallel

    cfg = tiny()
    W, n, D = dist.get_world_size(), 24, cfg.hidden_size
    biases = {"experts 0-2 only": [10.0, 10.0, 10.0] + [0.0] * 5, "skew to expert 0": [0.3] + [0.0] * 7,
              "no bias": [0.0] * 8, "no bias, eager combine": [0.0] * 8}
    cases = []
    for spec in ("expert=4", "fsdp=2,expert=2"):
        mesh = make_mesh(spec)
        for name, bias in biases.items():
            torch.manual_seed(3)
            ref = MoE(cfg)
            with torch.no_grad():
                for p in ref.parameters():
                    p.normal_(0.0, 0.3)
                ref.gate.bias.copy_(torch.tensor(bias))
            if "eager" in name:
                ref.dispatcher.scheme = "eager"
            gen = torch.Generator().manual_seed(4)
            X = torch.randn(W * n, D, generator=gen)
            G = torch.randn(W * n, D, generator=gen)
            xr = X.clone().requires_grad_(True)
            o = ref(xr.view(W, n, D))
            ((o.out.reshape(W * n, D) * G).sum() / W).backward()
            ep = MoE(cfg)
            ep.load_state_dict(ref.state_dict())
            apply_expert_parallel(ep, mesh)
            if "eager" in name:  # set after the dispatcher was replaced: it forwards to the local one
                ep.dispatcher.scheme = "eager"
                assert ep.dispatcher.inner.scheme == "eager"
            rows = slice(rank * n, (rank + 1) * n)
            xl = X[rows].clone().requires_grad_(True)
            ol = ep(xl.view(1, n, D))
            (ol.out.reshape(n, D) * G[rows]).sum().backward()
            counts = ol.counts.clone()
            dist.all_reduce(counts)
            # errors relative to the largest reference value of each tensor
            def err(a, b):
                return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

            out_err = err(ol.out.reshape(n, D), o.out.reshape(W * n, D)[rows])
            grad_err = err(xl.grad / W, xr.grad[rows])  # the reference loss is the mean over the W slices
            ref_grads = dict(ref.named_parameters())
            for pname, p in ep.named_parameters():
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                if not isinstance(p.grad, DTensor):  # router and shared expert: this rank's part of the mean
                    dist.all_reduce(g)
                    g /= W
                grad_err = max(grad_err, err(g, ref_grads[pname].grad))
            errs = torch.tensor([out_err, grad_err])
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            per_rank = counts.view(mesh.ep, -1).sum(1)  # rows each expert rank receives
            c = {"mesh": spec, "case": name, "counts_equal": bool(torch.equal(counts, o.counts)),
                 "out_err": float(errs[0]), "grad_err": float(errs[1]),
                 "zero_split": bool((per_rank == 0).any()), "skew": float(per_rank.max() / per_rank.sum())}
            cases.append(c)
            if rank == 0:
                print(f"[ep] {c}", flush=True)
    if rank == 0:
        with open(os.path.join(out, "ep.json"), "w") as f:
            json.dump({"cases": cases}, f, indent=1)
    dist.barrier()


def check_accum(out: str, rank: int) -> None:
    """3 steps of 2 accumulated micro-batches of 8 rows on fsdp=2,expert=2 (4 ranks, 2 rows each)
    vs 3 single-process steps of one 16-row batch."""
    cfg = tiny()
    big, acc = tcfg(batch_size=16, grad_accum=1, steps=3), tcfg(batch_size=16, grad_accum=2, steps=3)
    data = batches(cfg, 3, 16, big.seq_len, seed=1)
    ref = {}
    if rank == 0:
        single = TorchBackend(cfg, big, model=make_model(cfg))
        ref["loss"] = [single.train_step([data[0]], lr_at(0, big))["loss"]]
        ref["grad"] = grads(single)  # the first step's (clipped) gradients
        ref["loss"] += [single.train_step([data[s]], lr_at(s, big))["loss"] for s in range(1, 3)]
        ref["state"] = model_state(single)
    spec = "fsdp=2,expert=2"
    backend = ShardedTorchBackend(cfg, acc, make_mesh(spec), model=make_model(cfg))
    losses = []
    for s in range(3):
        x, y = data[s]
        micro = [(backend.local_rows(x[:8]), backend.local_rows(y[:8])),
                 (backend.local_rows(x[8:]), backend.local_rows(y[8:]))]
        losses.append(backend.train_step(micro, lr_at(s, acc))["loss"])
        if s == 0:
            grad = grads(backend)
    state = model_state(backend)
    if rank == 0:
        worst = max(state, key=lambda k: rel(state[k], ref["state"][k]))
        r = {"mesh": spec, "loss": losses, "ref_loss": ref["loss"],
             "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref["loss"])),
             "param_rel": rel(state[worst], ref["state"][worst]), "worst": worst,
             "grad_rel": max(rel(grad[k], ref["grad"][k]) for k in ref["grad"]),
             "grad_keys_equal": sorted(grad) == sorted(ref["grad"]),
             "bias_equal": all(np.array_equal(state[k], ref["state"][k]) for k in state if k.endswith("gate.bias"))}
        print(f"[accum {spec}] loss rel {r['loss_rel']:.2e}, first-step gradients rel {r['grad_rel']:.2e}, "
              f"worst param {worst} rel {r['param_rel']:.2e}", flush=True)
        with open(os.path.join(out, "accum.json"), "w") as f:
            json.dump(r, f, indent=1)
    dist.barrier()


def check_restore(out: str, rank: int) -> None:
    """The 4-rank DCP checkpoint restored on this job's ranks (2), on two meshes."""
    cfg, tc = tiny(), tcfg()
    results = {}
    for spec in ("fsdp=2", "expert=2"):
        backend = ShardedTorchBackend(cfg, tc, make_mesh(spec), model=make_model(cfg))
        backend.load_sharded(os.path.join(out, "dcp"))
        m, o = model_state(backend), optim_state(backend)
        if rank == 0:
            save_npz(os.path.join(out, f"restored_{spec.replace('=', '')}_model.npz"), m)
            save_npz(os.path.join(out, f"restored_{spec.replace('=', '')}_optim.npz"), o)
            results[spec] = True
        dist.barrier()
    if rank == 0:
        with open(os.path.join(out, "restore.json"), "w") as f:
            json.dump(results, f)


def cli_args(out: str) -> list[str]:
    """`dsv3 train` arguments of the launch check: a tiny byte-level model on a small text file."""
    return ["train", "--framework", "torch", "--config", os.path.join(out, "cli_cfg"), "--data",
            os.path.join(out, "cli_data.txt"), "--batch-size", "4", "--seq-len", "16", "--lr", "1e-3",
            "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2",
            "--no-progress", "--no-plots"]


def write_cli_inputs(out: str) -> None:
    tiny().replace(vocab_size=256).save_pretrained(os.path.join(out, "cli_cfg"))
    rng = np.random.default_rng(5)
    words = ["def", "main", "(", ")", ":", "return", "x", "+", "1", "\n", "import", "os", " "]
    with open(os.path.join(out, "cli_data.txt"), "w") as f:
        f.write(" ".join(rng.choice(words, size=12000)))


def check_cli(out: str, rank: int) -> None:
    """`dsv3 train` on this job's (2-rank) process group: 2 steps on fsdp=2, then resumed to 4 steps on expert=2."""
    from dsv3.cli import main as dsv3_main

    if rank == 0:
        write_cli_inputs(out)
    dist.barrier()
    run_dir = os.path.join(out, "cli_run")
    rc = [dsv3_main(cli_args(out) + ["--out", run_dir, "--mesh", "fsdp=2", "--steps", "2"]),
          dsv3_main(cli_args(out) + ["--out", run_dir, "--mesh", "expert=2", "--steps", "4", "--resume"])]
    if rank == 0:
        with open(os.path.join(out, "cli.json"), "w") as f:
            json.dump({"rc": rc}, f)
    dist.barrier()


def check_xf(out: str, rank: int) -> None:
    """The work of the JAX mesh job (tests/scale_workload.py: config, weights, batches, constant lr) on
    the 4-rank scale_workload.TORCH_MESH; its losses are compared with the JAX mesh's in
    tests/test_scale_parity.py."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    import scale_workload as w

    tc = TrainConfig(framework="torch", **w.TRAIN_KW)
    model = DeepSeekV3(w.CFG, dtype=torch.float32)
    model.load_canonical_state(w.initial_state())
    backend = ShardedTorchBackend(w.CFG, tc, make_mesh(w.TORCH_MESH), model=model)
    losses = [backend.train_step([(backend.local_rows(x), backend.local_rows(y)) for x, y in micro], w.LR)["loss"]
              for micro in w.batches()]
    if rank == 0:
        with open(os.path.join(out, "xf.json"), "w") as f:
            json.dump({"mesh": w.TORCH_MESH, "loss": losses}, f)


CHECKS = {"cli": check_cli, "train": check_train, "ep": check_ep, "accum": check_accum, "restore": check_restore,
          "xf": check_xf}


def regroup(n: int, rank: int) -> bool:
    """Destroy the job's default process group; ranks 0..n-1 then form a new one of n ranks (on a
    new rendezvous port chosen by rank 0), with the environment variables an n-process torchrun
    sets. Returns whether this rank is in the new group (the others have nothing left to do)."""
    import socket

    port = [0]
    if rank == 0:
        with socket.socket() as s:
            s.bind((os.environ.get("MASTER_ADDR", "127.0.0.1"), 0))
            port[0] = s.getsockname()[1]
    dist.broadcast_object_list(port, src=0)
    dist.barrier()
    dist.destroy_process_group()
    if rank >= n:
        return False
    os.environ.update({"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "GROUP_WORLD_SIZE": "1",
                       "ROLE_WORLD_SIZE": str(n), "MASTER_PORT": str(port[0]),
                       # rank 0 hosts the new rendezvous store (torchrun's agent store belongs to the old job)
                       "TORCHELASTIC_USE_AGENT_STORE": "False"})
    init_distributed()
    assert dist.get_world_size() == n and dist.get_rank() == rank
    return True


def main() -> None:
    import time

    torch.set_num_threads(1)
    out = sys.argv[1]
    lists = [names.split(",") for names in sys.argv[2:]]
    t0 = time.perf_counter()
    rank, _ = init_distributed()
    for i, names in enumerate(lists):
        if i and not regroup(2, rank):
            return
        for name in names:
            t, c = time.perf_counter(), time.process_time()
            CHECKS[name](out, rank)
            if rank == 0:
                print(f"[{name}] {time.perf_counter() - t:.1f} s wall, rank 0 CPU {time.process_time() - c:.1f} s",
                      flush=True)
    if rank == 0:
        print(f"[job] {time.perf_counter() - t0:.1f} s wall since the process group, rank 0 CPU "
              f"{time.process_time():.1f} s since start", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
