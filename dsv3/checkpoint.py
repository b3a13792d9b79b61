"""Checkpoint files: safetensors read/write, sharding, FP8 dequantisation.

On disk: safetensors with Hugging Face names (the table is `dsv3.names`),
per-expert tensors, optionally sharded with ``model.safetensors.index.json``;
the MTP depth k is stored as ``model.layers.{num_hidden_layers + k}``; FP8 e4m3
weights with 128x128 ``weight_scale_inv`` blocks are dequantised on load
(REFERENCE §7). Every file is written atomically (`dsv3.fileio`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from dsv3.config import ModelConfig
from dsv3.fileio import atomic_write_bytes, atomic_write_text
from dsv3.names import CheckpointError, canonical_to_hf, check_state, hf_to_canonical

__all__ = ["CheckpointError", "dequantize_fp8_blockwise", "read_safetensors", "read_hf_tensors", "fp8_block_size",
           "load_canonical", "save_canonical", "shard_tensors"]


# ------------------------------------------------------------------ FP8
def dequantize_fp8_blockwise(weight: np.ndarray, scale_inv: np.ndarray, block: int = 128,
                             dtype=np.float32) -> np.ndarray:
    """W[r, c] = float32(W_fp8[r, c]) * scale_inv[r // block, c // block].

    Partial edge blocks use their block's scale unchanged (REFERENCE §7).
    """
    rows, cols = weight.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match "
                              f"weight {weight.shape} in {block}x{block} blocks (expected {want})")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:rows, :cols]
    return (weight.astype(np.float32) * scale).astype(dtype)


# ---------------------------------------------------------- safetensors I/O
_ST_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays.

    safetensors' numpy backend handles every dtype but FP8, which numpy lacks;
    those few tensors are memory-mapped from the documented file layout.
    """
    from safetensors import safe_open

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out: dict[str, np.ndarray] = {}
    fp8 = {k for k, v in header.items() if v["dtype"] in _ST_DTYPES}
    if fp8:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for k in fp8:
            start, end = header[k]["data_offsets"]
            out[k] = raw[8 + n + start: 8 + n + end].view(_ST_DTYPES[header[k]["dtype"]]).reshape(header[k]["shape"])
    with safe_open(path, framework="numpy") as f:
        for k in header:
            if k not in fp8:
                out[k] = f.get_tensor(k)
    return out


def _checkpoint_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, fn) for fn in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory!r}")


def read_hf_tensors(directory: str, block: int = 128) -> dict[str, np.ndarray]:
    """Every HF-named tensor of a checkpoint directory, FP8 weights dequantised (fp32)."""
    tensors: dict[str, np.ndarray] = {}
    for path in _checkpoint_files(directory):
        tensors.update(read_safetensors(path))
    for name in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wname = name[: -len("_scale_inv")]
        if wname not in tensors:
            raise CheckpointError(f"{name} has no weight {wname}")
        tensors[wname] = dequantize_fp8_blockwise(tensors[wname], tensors.pop(name), block)
    left = [k for k, v in tensors.items() if v.dtype in _ST_DTYPES.values()]
    if left:
        raise CheckpointError(f"FP8 tensors without weight_scale_inv: {left[:10]}")
    return tensors


def fp8_block_size(directory: str) -> int:
    """The FP8 scale block of a checkpoint's ``quantization_config`` (128 when absent)."""
    qpath = os.path.join(directory, "config.json")
    if not os.path.exists(qpath):
        return 128
    with open(qpath) as f:
        q = json.load(f).get("quantization_config") or {}
    if not q:
        return 128
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"unsupported quantization_config {q}")
    bs = q.get("weight_block_size", [128, 128])
    if bs[0] != bs[1]:
        raise CheckpointError(f"non-square weight_block_size {bs} is not supported")
    return int(bs[0])


def load_canonical(directory: str, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a HF-layout checkpoint into (config, canonical flat dict), validated.

    A checkpoint with no MTP layer at all (transformers never saves one) loads
    with ``num_nextn_predict_layers=0``; a partial MTP layer is an error.
    """
    cfg = cfg or ModelConfig.from_pretrained(directory)
    tensors = read_hf_tensors(directory, fp8_block_size(directory))
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in tensors):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    state = hf_to_canonical(tensors, cfg)
    check_state(state, cfg, what=f"checkpoint {directory!r}")
    return cfg, state


def shard_tensors(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Tensors in name order, cut into files of at most ``max_shard_bytes`` (a larger tensor has its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def save_canonical(directory: str, state: Mapping[str, np.ndarray], cfg: ModelConfig,
                   max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write config.json and HF-named safetensors (sharded above max_shard_bytes)."""
    from safetensors.numpy import save

    check_state(state, cfg)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in canonical_to_hf(state, cfg).items()}
    shards = shard_tensors(tensors, max_shard_bytes)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if len(shards) == 1:
        atomic_write_bytes(os.path.join(directory, "model.safetensors"), save(shards[0], metadata={"format": "pt"}))
        # A stale index from an earlier sharded save would take precedence on load.
        if os.path.exists(index_path):
            os.remove(index_path)
    else:
        weight_map = {}
        for n, shard in enumerate(shards):
            fn = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write_bytes(os.path.join(directory, fn), save(shard, metadata={"format": "pt"}))
            weight_map.update({k: fn for k in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        atomic_write_text(index_path, json.dumps(index, indent=2))
    cfg.save_pretrained(directory)
