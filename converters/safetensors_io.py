"""Streaming safetensors I/O, one tensor at a time (no memory map, no intermediate copy), so a
conversion holds the model once plus one tensor. Format: an 8-byte little-endian header
length, a JSON header (``dtype``, ``shape``, ``data_offsets``), the raw tensor bytes."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from probsft_megatron.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_HEADER_ALIGN = 8

if sys.byteorder != "little":  # the format is little-endian; tensors are copied byte for byte
    raise ImportError("probsft_megatron.converters.safetensors_io needs a little-endian machine")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first data byte in the file
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor descriptions of a safetensors file, in the order their bytes appear."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {entry['dtype']}, which this "
                "converter does not read; save the checkpoint in bf16/fp16/fp32"
            )
        begin, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        infos[name] = TensorInfo(path, name, dtype, shape, data_start + begin, end - begin)
    return dict(sorted(infos.items(), key=lambda kv: kv[1].offset))


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_into(f, info: TensorInfo, dst: torch.Tensor) -> None:
    """Copy the tensor ``info`` from the open file ``f`` into ``dst`` (same number of
    elements): straight in when contiguous with the file's dtype, else via one temporary."""
    if dst.numel() != math.prod(info.shape):
        raise CheckpointError(
            f"{info.path}: tensor {info.name} has shape {list(info.shape)}, "
            f"expected {dst.numel()} elements"
        )
    direct = dst.is_contiguous() and dst.dtype == info.dtype
    buf = dst if direct else torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        f.seek(info.offset)
        view, done = _bytes_view(buf), 0
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{info.path} is truncated (tensor {info.name})")
            done += n
    if not direct:
        dst.copy_(buf.reshape(dst.shape))


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into a new tensor."""
    out = torch.empty(info.shape, dtype=info.dtype)
    with open(info.path, "rb") as f:
        read_into(f, info, out)
    return out


def write_file(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
) -> int:
    """Write a safetensors file of ``specs`` (``(name, shape, dtype)`` in file order), each
    tensor made when written by ``produce(name)``; returns the data bytes written."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(
                    f"{name}: produced {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}"
                )
            if t.numel():
                f.write(_bytes_view(t.contiguous()))
    return offset
