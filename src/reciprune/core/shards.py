"""Safetensors checkpoints read and written a few tensors at a time (models larger than memory).

`ShardReader` reads single tensors from a folder's `model.safetensors` or its shards (through the
index), never the whole file. `ShardWriter` lays the output files out up front (each file's
header with every tensor's dtype, shape and offset, in the order safetensors itself stores them)
and fills each tensor's bytes when it is ready, so a decoder layer can be written as soon as it
is compressed; given save_pretrained's shard split, the files are the ones it would write.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from reciprune.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


class ShardReader:
    """Tensors of a Hugging Face safetensors checkpoint folder, by name, one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if (self.folder / INDEX_FILE).is_file():
            index = json.loads((self.folder / INDEX_FILE).read_text(encoding="utf-8"))
            self.file_of: dict[str, str] = dict(index["weight_map"])
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as handle:
                self.file_of = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            raise ModelLoadError(
                f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}: the streaming pipeline reads "
                "safetensors checkpoints. Use --pipeline sequential or layerwise for this model."
            )

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def files(self) -> dict[str, list[str]]:
        """Shard file → the tensor names it holds, in the index's order."""
        layout: dict[str, list[str]] = {}
        for name, file in self.file_of.items():
            layout.setdefault(file, []).append(name)
        return layout

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.folder / self.file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def slices(self, name: str) -> StoredRows:
        """Tensor `name` readable a block of rows (first dimension) at a time."""
        return StoredRows(self.folder / self.file_of[name], name)


class StoredRows:
    """One stored tensor, read by blocks of rows without reading the rest of it."""

    def __init__(self, file: Path, name: str) -> None:
        self.file, self.name = file, name
        with safe_open(file, framework="pt") as handle:
            stored = handle.get_slice(name)
            self.shape = tuple(stored.get_shape())
            element = torch.empty((), dtype=_TORCH_DTYPES[stored.get_dtype()]).element_size()
        self.rows = self.shape[0] if self.shape else 1
        self.bytes_per_row = element * torch.Size(self.shape[1:]).numel()  # 1 for a scalar

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows `start:end` (the whole tensor when it has no dimensions)."""
        with safe_open(self.file, framework="pt") as handle:
            if not self.shape:
                return handle.get_tensor(self.name)
            return handle.get_slice(self.name)[start:end]


class ShardWriter:
    """Output safetensors files with a fixed layout, filled tensor by tensor.

    `layout` maps each output file to its tensors' names; `specs` gives each name's (dtype,
    shape). Tensors are stored in name order, as `safetensors.torch.save_file` stores them.
    """

    def __init__(
        self,
        folder: Path,
        layout: dict[str, list[str]],
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    ) -> None:
        self.folder = folder
        self._where: dict[str, tuple[str, int, int]] = {}  # name → (file, start, end) absolute
        self._pending: set[str] = set()
        self._rows = {name: shape[0] if shape else 1 for name, (_, shape) in specs.items()}
        self._rows_written: dict[str, int] = {}
        sizes = [self._lay_out(file, sorted(names), specs) for file, names in layout.items()]
        if len(layout) > 1:
            weight_map = {n: f for f, names in layout.items() for n in names}
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _lay_out(self, file: str, names: list[str], specs: dict) -> int:
        """Write `file`'s header and reserve room for its tensors; returns their size in bytes."""
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            dtype, shape = specs[name]
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}  # fmt: skip
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        start = 8 + len(text)
        with open(self.folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(start + offset)
        for name in names:
            begin, end = header[name]["data_offsets"]  # type: ignore[index]
            self._where[name] = (file, start + begin, start + end)
            self._pending.add(name)
        return offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store `tensor` (same dtype and shape as laid out) under `name`."""
        file, begin, end = self._where[name]
        data = tensor.detach().to("cpu").contiguous().flatten().view(torch.uint8).numpy()
        if data.nbytes != end - begin:
            raise ValueError(f"{name}: {data.nbytes} bytes given, {end - begin} laid out")
        with open(self.folder / file, "r+b") as handle:
            handle.seek(begin)
            handle.write(data)  # the buffer itself: no copy of a large tensor
        self._pending.discard(name)

    def write_rows(self, name: str, start: int, block: torch.Tensor) -> None:
        """Store rows `start:start + len(block)` of `name` (a tensor written by blocks)."""
        file, begin, end = self._where[name]
        row_bytes = (end - begin) // self._rows[name]
        data = block.detach().to("cpu").contiguous().flatten().view(torch.uint8).numpy()
        if data.nbytes % row_bytes or begin + start * row_bytes + data.nbytes > end:
            raise ValueError(f"{name}: {data.nbytes} bytes at row {start} do not fit its layout")
        with open(self.folder / file, "r+b") as handle:
            handle.seek(begin + start * row_bytes)
            handle.write(data)
        written = self._rows_written.get(name, 0) + data.nbytes // row_bytes
        self._rows_written[name] = written
        if written >= self._rows[name]:
            self._pending.discard(name)

    def close(self) -> None:
        """Check that every tensor was written."""
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[:3]}")
