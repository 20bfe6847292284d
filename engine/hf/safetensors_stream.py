"""safetensors files read and written one tensor at a time, with plain file I/O.

    header, start = read_header(path)                   # {name: {"dtype", "shape", "data_offsets"}}, data start
    t = read_tensor(path, start, header[name])          # just that tensor's bytes, no mmap
    w = StreamWriter(path, {"key": (torch.bfloat16, (4, 8))}, metadata={"format": "pt"})
    w.write("key", t); w.close()

Why not safetensors' own API: its loader maps the whole file (touched pages stay resident while it is
open) and its writer wants every tensor of a file in memory at once. Importing (and exporting) a model
tensor by tensor keeps the host at one tensor plus the one being written. The format: an 8-byte little-endian header
length, a JSON header (padded with spaces to 8 bytes), then the tensors' bytes, each at its offsets.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from engine.hf.config import HFError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""The stored dtypes accepted (an allow-list: anything else is refused by name)."""
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Every tensor's entry, checked against the file's size; and where the data starts."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise HFError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise HFError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for name, e in header.items():
        dtype, shape, (a, b) = e.get("dtype"), e.get("shape"), e.get("data_offsets", (-1, -1))
        if dtype not in DTYPES:
            raise HFError(f"{path}: tensor {name!r} is stored as {dtype}; import reads {', '.join(DTYPES)}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= a <= b or b - a != nbytes or start + b > size:
            raise HFError(f"{path}: tensor {name!r} has offsets {a}..{b} that do not fit its shape {shape} "
                          f"or the file ({size} bytes); the file is truncated or damaged")
    return header, start


def read_tensor(path: Path, start: int, entry: dict) -> torch.Tensor:
    a, b = entry["data_offsets"]
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    if b == a:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(b - a)
    with path.open("rb") as f:
        f.seek(start + a)
        if f.readinto(buf) != len(buf):
            raise HFError(f"{path}: ended inside a tensor; the file is truncated")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class StreamWriter:
    """One safetensors file whose header is known in advance; tensors are written in any order."""

    def __init__(self, path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.entries, header, offset = path, entries, {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for key, (dtype, shape) in entries.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header, self.start = header, 8 + len(raw)
        self.f = path.open("wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.start + offset)

    def write(self, key: str, t: torch.Tensor) -> None:
        dtype, shape = self.entries[key]
        assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (key, t.dtype, t.shape)
        self.f.seek(self.start + self.header[key]["data_offsets"][0])
        self.f.write(tensor_bytes(t))

    def close(self) -> int:
        """Flush to disk; the file's size."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.path.stat().st_size
