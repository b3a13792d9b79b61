"""The training work of both scale-out jobs: the JAX mesh job (tests/jax/mesh_checks.py, 8 simulated
devices) and the torch job (tests/torch/dist_job.py, 4 gloo ranks) train this config from these
weights on these batches, so their sharded runs can also be compared with each other
(tests/test_scale_parity.py). Plain numpy: no framework is imported here.
"""

from __future__ import annotations

import os
import socket

import numpy as np

from dsv3 import ModelConfig

STEPS, BATCH, ACCUM, SEQ, LR = 20, 16, 2, 16, 3e-3
# tiny with one (dense) layer and the MTP block (a MoE layer): every kind of parameter the sharding rules
# cover (embedding, attention, norms, dense MLP, router weight and bias, routed and shared experts, the
# MTP projection, head), one block of each kind to compile.
CFG = ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=1, bias_update_speed=1e-2)
# Adam divides by |g| + eps: with eps=1e-8 a gradient element of ~1e-8 (fp32 summation-order noise
# between layouts) moves its update by O(lr) -- eps=1e-3 keeps this a test of the layouts, as
# tests/test_train_backends.py does for gradient accumulation. The lr is constant (LR every step).
TRAIN_KW = dict(batch_size=BATCH, grad_accum=ACCUM, seq_len=SEQ, lr=LR, warmup_steps=2, eps=1e-3)
TORCH_MESH, JAX_MESH = "fsdp=2,expert=2", "data=2,fsdp=2,expert=2"  # the pair compared across frameworks
CLI_MESH = "data=2,fsdp=2,expert=2"  # `dsv3 train` in the JAX job (and as 2 processes, tests/jax/test_sharding.py)
CLI_STEPS = 4  # checkpoints at steps 2 and 4; the resumed run continues from step 2


def initial_state(cfg: ModelConfig = CFG) -> dict[str, np.ndarray]:
    """HF's initialisation (dsv3.bench.random_state, seed 0) with the router weights N(0, 0.5): the
    affinities spread apart, so no top-k choice is a near-tie that another summation order could flip."""
    from dsv3.bench import random_state

    state = random_state(cfg, 0)
    for k in state:
        if k.endswith(".gate.weight"):  # the routers
            state[k] = state[k] * np.float32(0.5 / cfg.initializer_range)
    return state


def batches() -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """STEPS optimizer steps of ACCUM micro-batches of BATCH // ACCUM sequences (inputs, labels)."""
    rng = np.random.default_rng(0)
    mb = BATCH // ACCUM
    return [[(rng.integers(0, 256, (mb, SEQ)), rng.integers(0, 256, (mb, SEQ))) for _ in range(ACCUM)]
            for _ in range(STEPS)]


def write_cli_inputs(cfg_dir: str, text: str) -> None:
    """The CLI run's config and a 24 KB text file of varied bytes (train and validation blocks)."""
    CFG.save_pretrained(cfg_dir)
    with open(text, "w") as f:
        f.write("".join(f"line {i}: {'abcdefghij'[i % 10] * (i % 37)} {i * i}\n" for i in range(1200)))


def cli_args(cfg_dir: str, text: str, out: str, devices: int = 8) -> list[str]:
    """`dsv3 train` on CLI_MESH; also the arguments of the 2-process run in tests/jax/test_sharding.py."""
    return ["train", "--cpu-devices", str(devices), "--mesh", CLI_MESH, "--config", cfg_dir, "--data", text,
            "--steps", str(CLI_STEPS), "--save-every", "2", "--eval-every", "2", "--batch-size", str(BATCH),
            "--grad-accum", str(ACCUM), "--seq-len", str(SEQ), "--lr", str(LR), "--warmup-steps", "2",
            "--adam-eps", "1e-3", "--eval-batches", "1", "--out", out, "--no-progress", "--no-plots"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous of a multi-process job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(root: str) -> dict:
    """This environment with the repository first on PYTHONPATH. The test session's XLA settings (root
    conftest) are kept; a job's device count comes from its own ``--cpu-devices``, which replaces any."""
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
