"""Read and write safetensors files with numpy only (bfloat16 via ml_dtypes), no torch."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from fairdiff_jax.errors import FairdiffError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (their stored dtype)."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            data = f.read()
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FairdiffError(f"cannot read safetensors file {path}: {err}; re-download or re-export it.") from err
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise FairdiffError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        if end > len(data):
            raise FairdiffError(f"{path} is truncated (tensor '{name}' runs past the end); re-download it.")
        out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (empty if none)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(header_len)).get("__metadata__", {}))


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write numpy arrays to a safetensors file (atomically: a temp file renamed into place)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        if array.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor '{name}' of dtype {array.dtype} to safetensors")
        blob = array.tobytes()
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)
