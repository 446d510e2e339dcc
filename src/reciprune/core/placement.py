"""Where decoder layers live between uses and where they run.

A calibration pipeline asks its placement to `fetch` a layer onto the execution device before
the layer's statistics forward and to `release` it after propagation; the modules outside the
decoder layers (embeddings, rotary tables, final norm, output head) are on the device only
inside `outer_on_device` (capturing the first layer's inputs, the head's perplexity pass).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from reciprune.core.layer_io import LayerStep, layers_swapped
from reciprune.core.layers import find_decoder_layers
from reciprune.core.shards import ShardReader, ShardWriter


def return_freed_memory() -> None:
    """Give memory freed by the allocator back to the system (glibc's malloc_trim). A layer's
    tensors are a few MB each, which glibc serves from its heap once such blocks have been
    freed; without trimming, streaming 80 layers would grow the process by ~80 layers' worth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, below `module`) by `tensor`."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


class InMemory:
    """Layers stay where the model is (one device); nothing moves."""

    def __init__(self, model: nn.Module) -> None:
        self.device = next(model.parameters()).device

    def fetch(self, step: LayerStep) -> None:
        """Make the layer ready to run on `self.device`."""

    def release(self, step: LayerStep, *, changed: bool) -> None:
        """Done with the layer (`changed`: compressed, so its new weights must be kept)."""

    @contextmanager
    def outer_on_device(self, model: nn.Module) -> Iterator[None]:
        yield


class Onload(InMemory):
    """Weights in CPU memory; each layer is moved to the device while it is used."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.home = torch.device("cpu")

    def fetch(self, step: LayerStep) -> None:
        step.layer.to(self.device)

    def release(self, step: LayerStep, *, changed: bool) -> None:
        step.layer.to(self.home)

    @contextmanager
    def outer_on_device(self, model: nn.Module) -> Iterator[None]:
        if self.device == self.home:
            yield
            return
        with layers_swapped(model):
            model.to(self.device)
        try:
            yield
        finally:
            with layers_swapped(model):
                model.to(self.home)


class Streamed(Onload):
    """Layers on disk: each is read from the input checkpoint's safetensors when its turn comes
    and, once compressed, written into the output files and dropped (models larger than memory).

    The modules outside the layers (embeddings, final norm, head) are read only for
    `outer_on_device` and dropped after it: a 70B model's embeddings and head are several GB,
    which a layer walk does not need. `finish` copies them into the output file by row blocks.
    Without a writer (a read-only pass such as perplexity) nothing is written.
    """

    #: Rows of an outer tensor (embeddings, head) copied at a time at `finish`.
    COPY_BYTES = 64 << 20

    def __init__(
        self,
        device: torch.device,
        reader: ShardReader,
        dtype: torch.dtype,
        writer: ShardWriter | None = None,
    ) -> None:
        super().__init__(device)
        self.reader, self.dtype, self.writer = reader, dtype, writer

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(self.device, dtype)

    def fetch(self, step: LayerStep) -> None:
        for name in step.layer.state_dict():
            tensor = self.reader.get(f"{step.layer_name}.{name}")
            set_tensor(step.layer, name, self._to_compute(tensor))

    def release(self, step: LayerStep, *, changed: bool) -> None:
        for name, tensor in step.layer.state_dict().items():
            if changed and self.writer is not None:
                self.writer.write(f"{step.layer_name}.{name}", tensor)
            set_tensor(step.layer, name, torch.empty_like(tensor, device="meta"))
        return_freed_memory()

    def outer_names(self, model: nn.Module) -> list[str]:
        """The stored tensors outside the decoder layers."""
        layers_name, _ = find_decoder_layers(model)
        return [n for n in self.reader.names if not n.startswith(layers_name + ".")]

    @contextmanager
    def outer_on_device(self, model: nn.Module) -> Iterator[None]:
        names = self.outer_names(model)
        for name in names:
            set_tensor(model, name, self._to_compute(self.reader.get(name)))
        model.tie_weights()
        try:
            yield
        finally:
            drop_outer_weights(model, names)

    def finish(self, model: nn.Module) -> None:
        """Copy the tensors outside the decoder layers (never changed by a oneshot stage) into
        the output, and check that nothing is missing."""
        if self.writer is None:
            return
        for name in self.outer_names(model):
            stored = self.reader.slices(name)
            row_bytes = max(1, stored.bytes_per_row)
            rows = max(1, self.COPY_BYTES // row_bytes)
            for start in range(0, stored.rows, rows):
                block = stored.read(start, start + rows)
                dtype = self.dtype if block.is_floating_point() else block.dtype
                self.writer.write_rows(name, start, block.to(dtype))
        self.writer.close()


def drop_outer_weights(model: nn.Module, names: list[str]) -> None:
    """Put the tensors `names` (outside the decoder layers) back on the meta device."""
    state = model.state_dict()
    for name in names:
        set_tensor(model, name, torch.empty_like(state[name], device="meta"))
    model.tie_weights()
    return_freed_memory()
