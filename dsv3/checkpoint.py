"""Checkpoint files: safetensors read/write, sharding, FP8 dequantisation.

On disk: safetensors with Hugging Face names (the table is `dsv3.names`),
per-expert tensors, optionally sharded with ``model.safetensors.index.json``;
the MTP depth k is stored as ``model.layers.{num_hidden_layers + k}``; FP8 e4m3
weights with 128x128 ``weight_scale_inv`` blocks are dequantised on load
(docs/reference.md §7). Every file is written atomically (`dsv3.fileio`).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from typing import Mapping

import ml_dtypes
import numpy as np

from dsv3.config import ModelConfig
from dsv3.fileio import atomic_write_bytes, atomic_write_text
from dsv3.names import CheckpointError, canonical_to_hf, check_state, hf_to_canonical

__all__ = ["CheckpointError", "CheckpointCastWarning", "dequantize_fp8_blockwise", "read_safetensors",
           "read_hf_tensors", "fp8_block_size", "load_canonical", "save_canonical", "shard_tensors"]


# ------------------------------------------------------------------ FP8
def dequantize_fp8_blockwise(weight: np.ndarray, scale_inv: np.ndarray, block: int = 128,
                             dtype=np.float32) -> np.ndarray:
    """W[r, c] = float32(W_fp8[r, c]) * scale_inv[r // block, c // block].

    Partial edge blocks use their block's scale unchanged (docs/reference.md §7).
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
# Bytes per element of every safetensors dtype (the format's list), for the header's consistency check.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# Weights load in these dtypes as stored (FP8 with its weight_scale_inv); F16 and F64 are cast to
# float32 with a CheckpointCastWarning; any other dtype (integers, bool) is a CheckpointError.
_WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
                  np.dtype(ml_dtypes.float8_e5m2))
_CAST_DTYPES = (np.dtype(np.float16), np.dtype(np.float64))


class CheckpointCastWarning(UserWarning):
    """Checkpoint tensors were stored in a dtype the models do not use and were cast on load."""


def _list(items: list[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _read_header(path: str) -> tuple[int, dict]:
    """(header length, header without __metadata__) of a safetensors file, every entry checked
    against the file's size, so a truncated or corrupt file is a CheckpointError naming it."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; the 8-byte "
                              "header length alone needs 8)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (its header claims {n} bytes; "
                                  f"the file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              "not an object of tensors)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, e in header.items():
        bad = f"{path}: corrupt safetensors header entry for tensor {name!r}"
        if not (isinstance(e, dict) and e.get("dtype") in _ST_ITEMSIZE and isinstance(e.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in e["shape"])
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(type(o) is int for o in e["data_offsets"])):
            raise CheckpointError(f"{bad} ({e!r:.200})")
        start, end = e["data_offsets"]
        if not 0 <= start <= end:
            raise CheckpointError(f"{bad} (data_offsets {e['data_offsets']})")
        if end > data:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, "
                                  f"which has {data} bytes")
        want = int(np.prod(e["shape"], dtype=np.int64)) * _ST_ITEMSIZE[e["dtype"]]
        if end - start != want:
            raise CheckpointError(f"{bad} ({end - start} bytes for shape {e['shape']} of {e['dtype']}, "
                                  f"which needs {want})")
    return n, header


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays.

    safetensors' numpy backend handles every dtype but FP8, which numpy lacks;
    those few tensors are memory-mapped from the documented file layout. A
    truncated or corrupt file raises CheckpointError naming the file (and the tensor).
    """
    from safetensors import safe_open

    n, header = _read_header(path)
    out: dict[str, np.ndarray] = {}
    fp8 = {k for k, v in header.items() if v["dtype"] in _ST_DTYPES}
    if fp8:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for k in fp8:
            start, end = header[k]["data_offsets"]
            out[k] = raw[8 + n + start: 8 + n + end].view(_ST_DTYPES[header[k]["dtype"]]).reshape(header[k]["shape"])
    try:
        with safe_open(path, framework="numpy") as f:
            for k in header:
                if k not in fp8:
                    out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors' own checks (SafetensorError) on what the header check let pass
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    return out


def _checkpoint_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map "
                                  f"of tensor name -> file): {type(e).__name__}: {e}") from None
        paths = [os.path.join(directory, str(fn)) for fn in files]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {_list(missing)}")
        return paths
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory!r}")


def _check_weight_dtypes(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Refuse non-float tensors of one file; cast float16/float64 ones to float32 in place, with a warning."""
    wrong = [f"{k} ({v.dtype})" for k, v in tensors.items()
             if v.dtype not in _WEIGHT_DTYPES and v.dtype not in _CAST_DTYPES]
    if wrong:
        raise CheckpointError(f"{path}: tensors of a non-floating-point dtype: {_list(wrong)}; model weights "
                              "must be float32, bfloat16, float16 or FP8 e4m3 with a weight_scale_inv")
    cast = sorted(k for k, v in tensors.items() if v.dtype in _CAST_DTYPES)
    if cast:
        for k in cast:
            tensors[k] = tensors[k].astype(np.float32)
        warnings.warn(f"{path}: {len(cast)} float16/float64 tensors cast to float32 on load: {_list(cast)}",
                      CheckpointCastWarning, stacklevel=3)


def read_hf_tensors(directory: str, block: int = 128) -> dict[str, np.ndarray]:
    """Every HF-named tensor of a checkpoint directory, FP8 weights dequantised (fp32).

    CheckpointError, naming the file and the tensors: a truncated or corrupt file, a tensor in
    two files, an integer or bool tensor, a NaN or infinite value. float16/float64 tensors are
    cast to float32 with a CheckpointCastWarning naming them.
    """
    tensors: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for path in _checkpoint_files(directory):
        part = read_safetensors(path)
        _check_weight_dtypes(path, part)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise CheckpointError(f"{path}: tensors already read from another file: "
                                  f"{_list([f'{k} ({source[k]})' for k in twice])}")
        tensors.update(part)
        source.update(dict.fromkeys(part, path))
    for name in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wname = name[: -len("_scale_inv")]
        if wname not in tensors:
            raise CheckpointError(f"{name} has no weight {wname}")
        try:
            tensors[wname] = dequantize_fp8_blockwise(tensors[wname], tensors.pop(name), block)
        except CheckpointError as e:
            raise CheckpointError(f"{source[wname]}: {wname}: {e}") from None
    left = [k for k, v in tensors.items() if v.dtype in _ST_DTYPES.values()]
    if left:
        raise CheckpointError(f"FP8 tensors without weight_scale_inv: {left[:10]}")
    bad = []
    for k, v in tensors.items():
        n_bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        if n_bad:
            bad.append(f"{source[k]}: {k} ({n_bad} of {v.size} values)")
    if bad:
        raise CheckpointError("checkpoint tensors with NaN or infinite values (the weights are corrupt or "
                              "came from a diverged run):\n  " + "\n  ".join(bad[:20])
                              + (f"\n  ... ({len(bad)} tensors in all)" if len(bad) > 20 else ""))
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
