"""Safetensors files read and written one tensor at a time, for fusing models larger than memory.

`TensorFile` parses a file's header (the JSON after an 8-byte length) and reads a
tensor's bytes with one positioned read into a fresh tensor: memory holds only
the tensors in use, and nothing is mapped, so an address-space limit (`prlimit
--as`) counts exactly what is held. `write_tensors` writes the header first (every
name, dtype and shape is known before any value) and then each tensor as it is
computed, so the output never exists in memory as a whole. Files written here
are ordinary safetensors files (`safetensors.safe_open` and `load_file` read them).
"""

import json
import os
import struct
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ntdist.errors import UserError
from ntdist.records.files import replacing

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000   # bytes: a larger header means a damaged file, as safetensors itself decides
ALIGN = 8                  # the data start on a multiple of 8 bytes, as safetensors writes them


class TensorFile:
    """One safetensors file: its metadata, and each tensor's dtype, shape and byte range, read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > MAX_HEADER:
                    raise ValueError(f"header of {length} bytes")
                header = json.loads(f.read(length))
            self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
            self.entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {
                name: (DTYPES[e["dtype"]], tuple(e["shape"]), 8 + length + e["data_offsets"][0],
                       e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()}
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise UserError(f"'{path}' is not a readable safetensors file ({type(err).__name__}: {err}); give "
                            "safetensors files (or folders of them) to fuse with --lazy") from None

    def meta(self, name: str) -> torch.Tensor:
        """A tensor on the meta device with the dtype and shape of `name` (no data)."""
        dtype, shape, _, _ = self.entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from disk into memory of its own."""
        dtype, shape, start, size = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        raw = out.reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes != size:
            raise UserError(f"'{self.path}': tensor '{name}' has {size} bytes, its shape {list(shape)} needs "
                            f"{raw.nbytes}; the file is damaged")
        with open(self.path, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(raw)) != size:
                raise UserError(f"'{self.path}' ends inside tensor '{name}'; the file is damaged")
        return out


def header_bytes(entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]], metadata: Optional[dict]) -> bytes:
    """The length prefix and JSON header for tensors `entries` (name, dtype, shape) stored in that order."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGN)
    return struct.pack("<Q", len(text)) + text


def write_tensors(path: str, entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]],
                  produce: Callable[[str], torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Atomically write a safetensors file of `entries` (name, dtype, shape), asking `produce(name)` for each
    tensor in that order; each is dropped once written."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header_bytes(entries, metadata))
            for name, dtype, shape in entries:
                t = produce(name)
                assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, dtype, shape)
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t


def open_files(paths: Iterable[str]) -> Dict[str, Tuple[TensorFile, str]]:
    """Every tensor name of the files `paths` (a model's shards) -> (its file, its name there)."""
    index = {}
    for path in paths:
        tf = TensorFile(path)
        index.update((name, (tf, name)) for name in tf.entries)
    return index


def file_size(paths: Iterable[str]) -> int:
    """Bytes of the files `paths` together."""
    return sum(os.path.getsize(p) for p in paths)
