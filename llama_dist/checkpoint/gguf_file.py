"""A minimal GGUF v2/v3 reader: metadata parsed with struct from a memory map, tensor bytes read on demand.

We read the container ourselves rather than through gguf.GGUFReader, which builds a numpy
object per vocabulary entry, seconds of a start for a large vocabulary where this takes a fraction of one.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..quant.ggml import BLOCK_TYPES
from .source import CheckpointError

# GGML tensor type ids (ggml.h) of the types we can dequantize; other ids are reported by number.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order: rows first (GGUF lists the fastest dimension first)
    type_name: str
    offset: int  # of the first byte in the file
    data_rows: int
    row_bytes: int
    fd: int

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as uint8 [n, row_bytes], read from the file: nothing else is touched or kept."""
        n = (stop - start) * self.row_bytes
        buf = os.pread(self.fd, n, self.offset + start * self.row_bytes)
        return np.frombuffer(bytearray(buf), dtype=np.uint8).reshape(stop - start, self.row_bytes)


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, count: int) -> list[str]:
        """A string array in one tight loop: a tokenizer's vocabulary and merges hold ~100k entries."""
        buf, pos, out = self.buf, self.pos, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = length(buf, pos)
            pos += 8 + n
            out.append(str(buf[pos - n:pos], "utf-8", "replace"))
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == STRING:
                return self.strings(count)
            if etype in _NUMPY:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        return self.scalar(_SCALARS[vtype])


class GGUFFile:
    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        self.mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.fd = os.open(self.path, os.O_RDONLY)
        if bytes(self.mmap[:4]) != b"GGUF":
            raise CheckpointError(f"{self.path} is not a GGUF file (it does not start with the GGUF magic).")
        cur = _Cursor(memoryview(self.mmap))
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path} is GGUF version {self.version}; versions 2 and 3 are supported.")
        try:
            n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                self.metadata[key] = cur.value(cur.scalar("<I"))
            infos = []
            for _ in range(n_tensors):
                name, n_dims = cur.string(), cur.scalar("<I")
                dims = [cur.scalar("<Q") for _ in range(n_dims)]
                infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} ({size} bytes) ends inside its GGUF header: it is truncated or "
                                  f"corrupt (re-download it). ({e})") from None
        align = self.metadata.get("general.alignment", 32)
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensor] = {}
        self.unsupported: dict[str, int] = {}
        for name, dims, type_id, offset in infos:
            type_name = GGML_TYPES.get(type_id)
            if type_name is None:
                self.unsupported[name] = type_id
                continue
            block, type_size, _ = BLOCK_TYPES[type_name]
            shape = tuple(int(d) for d in reversed(dims))
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            row_bytes = shape[-1] // block * type_size
            start = data_start + offset
            if start + rows * row_bytes > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name} needs bytes up to "
                                      f"{start + rows * row_bytes} but the file has {size}. Re-download it.")
            self.tensors[name] = GGUFTensor(name, shape, type_name, start, rows, row_bytes, self.fd)
        del cur
        self.mmap = None  # the header is parsed; tensor bytes are read with pread, a rank's slice at a time
