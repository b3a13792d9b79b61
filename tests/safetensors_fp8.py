"""Test helper: write a safetensors file by its documented layout.

safetensors' numpy API cannot write FP8 (numpy has no float8 dtypes), and the
released DeepSeek-V3 checkpoint is FP8, so the loader's FP8 path is tested on
files written here.
"""

import json
import struct

import ml_dtypes
import numpy as np

_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
          np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def write_safetensors(path, tensors):
    """tensors {name: ndarray} (fp32, bf16, fp16, fp64, FP8 e4m3, int32/64, uint8, bool) -> one safetensors file."""
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v).tobytes()
        header[k] = {"dtype": _NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
