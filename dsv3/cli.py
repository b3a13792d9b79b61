"""The `dsv3` command: train | generate | convert | info | bench.

    dsv3 train                                  # JAX, `small` preset, default corpus, ~10 min on 2 CPU cores
    dsv3 train --framework torch --steps 200 --out runs/t
    dsv3 train --out runs/small --resume        # continue a killed run exactly
    dsv3 train --out runs/small --overwrite     # replace the run in runs/small (refused without it)
    dsv3 generate --checkpoint runs/small --prompt "def main("
    dsv3 convert --input DeepSeek-V3-fp8/ --output v3-bf16/ --dtype bfloat16
    dsv3 info --preset v3-671b
    dsv3 bench ...                              # dsv3.bench (see `dsv3 bench --help`)

Frameworks are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import errno
import json
import os
import sys
from typing import Optional, Sequence

from dsv3 import runtime
from dsv3.config import PRESETS, ModelConfig
from dsv3.flops import param_counts
from dsv3.rundir import DiskFullError
from dsv3.train_config import DTYPES, FRAMEWORKS, TrainConfig


# ------------------------------------------------------------------ parsers
class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a real default value."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_TYPES = {"int": int, "float": float, "str": str}


def _add_field(p, f: dataclasses.Field) -> None:
    """The flag of one TrainConfig field, from its metadata (see dsv3.train_config)."""
    meta = f.metadata
    flags = meta.get("flags") or ("--" + f.name.replace("_", "-"),)
    kw: dict = {"dest": f.name, "help": meta.get("help")}
    if isinstance(f.default, bool):
        if f.default:
            flags = ("--no-" + f.name.replace("_", "-"),)
        kw.update(action="store_false" if f.default else "store_true", default=f.default)
    else:
        kw.update(type=_TYPES[str(f.type).replace("Optional[", "").rstrip("]")],
                  default=meta.get("cli_default", f.default))
        kw.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
    p.add_argument(*flags, **kw)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (JAX/optax or PyTorch)",
                       description="Train DeepSeek-V3 with AdamW, warm-up + cosine schedule, the aux-loss-free "
                                   "bias update, the sequence-wise balance loss and MTP. Writes checkpoints, "
                                   "metrics.jsonl and PNG plots to --out.",
                       formatter_class=_Defaults)
    groups: dict = {}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group")
        if group is not None and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        _add_field(groups[group] if group else p, f)
    p.add_argument("--resume", action="store_true",
                   help="continue from --out's newest intact checkpoint (a broken newer one is skipped, with a "
                        "message)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (metrics, checkpoints, train_config) and start anew; "
                        "without it such a directory is refused")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="simulate N CPU devices (sets XLA_FLAGS before JAX starts), e.g. for --mesh on a laptop")
    g = p.add_argument_group("several JAX processes (one command per process; --framework jax --mesh)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, default=None, metavar="N")
    g.add_argument("--process-id", type=int, default=None, metavar="I")


def set_jax_processes(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int],
                      framework: str, mesh: Optional[str]) -> None:
    """--coordinator/--num-processes/--process-id -> the environment dsv3_jax.sharding.init_distributed reads."""
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if framework != "jax" or not mesh:
        raise ValueError("several processes: --framework jax with a --mesh (torch: use torchrun)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}) and --num-processes >= 1")
    os.environ.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(num_processes),
                      JAX_PROCESS_ID=str(process_id))


def set_cpu_devices(n: int) -> None:
    """Ask XLA:CPU for n devices: must run before jax is imported (the flag is read once, at start)."""
    if n < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {n}")
    if "jax" in sys.modules:  # the count is fixed once jax started: fine if it is already n CPU devices
        import jax

        if jax.default_backend() == "cpu" and jax.device_count() == n:
            return
        raise ValueError("--cpu-devices: jax is already imported; the device count can no longer change")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (latent KV cache, streamed)")
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a weights directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", choices=("latent", "naive"), default="latent")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--speculative", choices=("mtp",), default=None,
                   help="speculative decoding: the MTP module drafts, the model verifies (same output as without)")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and draft acceptance with --speculative)")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF DeepSeek-V3 checkpoint (e.g. FP8) to dequantised bf16/fp32")
    p.add_argument("--input", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--max-shard-gb", type=float, default=2.0)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="config summary and parameter counts")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS), default="small")
    g.add_argument("--config", metavar="CONFIG_JSON")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--mesh", default=None, metavar="AXES",
                   help="also print per-device bytes of parameters, AdamW state and activations per token on "
                        "this mesh (abstract: nothing is allocated), e.g. data=8,fsdp=32,expert=32")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the activation estimate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch and JAX/Flax NNX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,convert,info,bench}")
    _add_train(sub)
    _add_generate(sub)
    _add_convert(sub)
    _add_info(sub)
    sub.add_parser("bench", help="benchmark the two frameworks (see `dsv3 bench --help`)", add_help=False)
    return parser


# --------------------------------------------------------------- commands
def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["out"] = args.out or os.path.join("runs", f"{'custom' if args.config else args.preset}-{args.framework}")
    return TrainConfig(**values)


def backend_factory(framework: str):
    if framework == "jax":
        from dsv3_jax.train import make_backend
    else:
        from dsv3_torch.train import make_backend
    return make_backend


def _explicit_train_options(argv: Sequence[str]) -> set[str]:
    """TrainConfig fields given on the command line (not left at their defaults)."""
    parser = argparse.ArgumentParser(add_help=False)
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    train_parser = sub.choices["train"]
    for action in train_parser._actions:
        action.default = argparse.SUPPRESS
    ns = vars(parser.parse_args(list(argv)))
    return set(ns) & {f.name for f in dataclasses.fields(TrainConfig)}


def cmd_train(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from dsv3.training import NonFiniteLoss, train

    tcfg = train_config_from_args(args)
    saved = os.path.join(tcfg.out, "train_config.json")
    if args.resume and os.path.exists(saved):
        # Continue the run as it was configured; only options given now override it (e.g. --steps).
        with open(saved) as f:
            old = TrainConfig.from_dict(json.load(f))
        explicit = _explicit_train_options(argv)
        tcfg = TrainConfig.from_dict({**old.to_dict(), **{k: getattr(tcfg, k) for k in explicit}, "out": tcfg.out})
    if tcfg.compile and tcfg.framework != "torch":
        raise ValueError("--compile applies to --framework torch only (the JAX step is always nnx.jit-compiled)")
    try:
        # the framework is imported inside the run, after it holds --out's lock: a refused run fails at once
        train(tcfg, lambda cfg, t: backend_factory(t.framework)(cfg, t), resume=args.resume,
              overwrite=args.overwrite)
    except NonFiniteLoss as err:
        print(f"dsv3 train: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        detail = err.strerror if isinstance(err, DiskFullError) else f"no space left on the device ({err})"
        print(f"dsv3 train: error: {detail}", file=sys.stderr)
        return 1
    return 0


class _Streamer:
    """Prints generated bytes as they arrive, decoding UTF-8 incrementally."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, row: int, token: int) -> None:
        self.stream.write(self.dec.decode(bytes([int(token)])))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write(self.dec.decode(b"", final=True))
        self.stream.flush()


def generate_text(checkpoint: str, prompt: str, framework: str = "torch", max_new_tokens: int = 200,
                  temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: int = 0, cache: str = "latent", dtype: str = "float32", stream=None,
                  echo_prompt: bool = False, speculative: Optional[str] = None, stats=None) -> list[int]:
    """Load a checkpoint in either framework and generate from a byte-level prompt.

    New text is streamed to ``stream`` (default stdout; False: silent) token by token.
    speculative="mtp" drafts with the MTP module (`stats`, a SpeculativeStats, is filled).
    """
    from dsv3.data import ByteTokenizer
    from dsv3.rundir import resolve_weights_dir

    directory = resolve_weights_dir(checkpoint)
    cfg = ModelConfig.from_pretrained(directory)
    if cfg.vocab_size != 256:
        raise ValueError(f"this command speaks bytes (vocab 256); the checkpoint's vocab_size is {cfg.vocab_size}")
    ids = ByteTokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt must not be empty")
    streamer = _Streamer(stream) if stream is not False else None
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
              cache=cache, on_token=streamer, speculative=speculative, stats=stats)
    if framework == "torch":
        import torch

        import dsv3_torch

        model = dsv3_torch.DeepSeekV3.from_pretrained(directory, dtype=getattr(torch, dtype))
        model.eval()
        if streamer is not None and echo_prompt:
            streamer.stream.write(prompt)
        with torch.no_grad():
            out = dsv3_torch.generate(model, [ids], **kw)
    else:
        import jax.numpy as jnp

        import dsv3_jax

        model = dsv3_jax.DeepSeekV3.from_pretrained(directory, dtype=getattr(jnp, dtype))
        if streamer is not None and echo_prompt:
            streamer.stream.write(prompt)
        out = dsv3_jax.generate(model, [ids], **kw)
    if streamer is not None:
        streamer.close()
    return [int(t) for t in out[0]]


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from dsv3.generation import NonFiniteLogits
    from dsv3.speculative import SpeculativeStats

    stats = SpeculativeStats() if args.speculative else None
    t0 = time.perf_counter()
    try:
        out = generate_text(args.checkpoint, args.prompt, args.framework, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, args.seed, args.cache, args.dtype, echo_prompt=True,
                            speculative=args.speculative, stats=stats)
    except NonFiniteLogits as err:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"dsv3 generate: error: {err}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    if args.stats:
        wall = time.perf_counter() - t0
        line = f"{len(out)} tokens in {wall:.2f} s (load and compile included): {len(out) / wall:.1f} tokens/s"
        if stats is not None:
            line += (f"; drafted {stats.drafted}, accepted {stats.accepted} (acceptance rate "
                     f"{stats.acceptance_rate:.1%}), mean accepted length {stats.mean_accepted_length:.2f} "
                     f"per verify step")
        print(line, file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import ml_dtypes
    import numpy as np

    from dsv3.checkpoint import load_canonical, save_canonical

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError("--output must differ from --input")
    cfg, state = load_canonical(args.input)
    target = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    out = {}
    for name, arr in state.items():
        # The router bias stays fp32 (docs/reference.md §4.2); everything else takes the target dtype.
        out[name] = np.asarray(arr, np.float32) if name.endswith("gate.bias") else np.asarray(arr).astype(target)
    save_canonical(args.output, out, cfg, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    n = sum(int(a.size) for a in out.values())
    print(f"wrote {args.output}: {len(out)} canonical tensors, {n / 1e9:.3f}B values, {args.dtype}")
    return 0


def info_dict(cfg: ModelConfig) -> dict:
    pc = param_counts(cfg)  # the router bias is a buffer, not counted
    kv_latent = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_naive = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return {
        "layers": cfg.num_hidden_layers, "dense_layers": cfg.first_k_dense_replace, "moe_layers": cfg.n_moe_layers,
        "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
        "experts": f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
                   f"{cfg.topk_group} kept) + {cfg.n_shared_experts} shared",
        "mla": f"q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, nope/rope/v "
               f"{cfg.qk_nope_head_dim}/{cfg.qk_rope_head_dim}/{cfg.v_head_dim}",
        "mtp_depths": cfg.num_nextn_predict_layers, "max_position_embeddings": cfg.max_position_embeddings,
        "params_total": pc.total, "params_main": pc.main, "params_mtp": pc.mtp,
        "params_active_per_token": pc.active_per_token,
        "kv_cache_values_per_token": {"latent": kv_latent, "naive": kv_naive},
        "training": {"gamma": cfg.bias_update_speed, "alpha": cfg.balance_loss_alpha,
                     "lambda": cfg.mtp_loss_weight},
    }


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    cfg = ModelConfig.from_pretrained(args.config) if args.config else ModelConfig.preset(args.preset)
    d = info_dict(cfg)
    if args.mesh:
        from dsv3_jax.sharding import abstract_plan

        d["mesh"] = abstract_plan(cfg, args.mesh, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{args.config or args.preset}:")
    for k, v in d.items():
        if k == "mesh":
            continue
        if k.startswith("params_"):
            v = f"{v:,} ({_human(v)})"
        print(f"  {k:26s} {v}")
    if "mesh" in d:
        _print_mesh_plan(d["mesh"])
    return 0


def _print_mesh_plan(m: dict) -> None:
    print(f"  per device on {m['mesh']} ({m['devices']} devices, fp32 weights, AdamW):")
    for k, label in (("params", "parameters"), ("optimizer", "AdamW state"), ("total", "total")):
        print(f"    {label:24s} {m[k]:,} B ({m[k] / 2**30:.2f} GiB)")
    print(f"    {'activations per token':24s} {m['activations_per_token']:,} B at seq_len {m['seq_len']} "
          f"(of which attention probabilities {m['attention_probs_per_token']:,} B)")


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        import dsv3.bench as bench
    except ImportError as err:
        print(f"dsv3 bench: the benchmark module is not available ({err})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="dsv3 bench", description="benchmark PyTorch vs JAX")
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    rc = bench.run(args)
    return int(rc or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:  # the command itself (not a call from Python): restart once with huge pages for malloc
        runtime.restart_with_hugepages()
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime.configure()  # before torch or jax allocate or compile anything
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"train": lambda a: cmd_train(a, argv), "generate": cmd_generate, "convert": cmd_convert,
                "info": cmd_info}
    try:
        if getattr(args, "cpu_devices", None):
            set_cpu_devices(args.cpu_devices)  # before any command imports jax
        if args.command == "train":
            set_jax_processes(args.coordinator, args.num_processes, args.process_id, args.framework, args.mesh)
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        print(f"dsv3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndsv3 {args.command}: interrupted (the last complete checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
