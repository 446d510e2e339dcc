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

    def __init__(self, device: torch.device, home: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.home = torch.device(home)

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

    The modules outside the layers are in memory (CPU) throughout; `writer` receives them at
    `finish`. Without a writer (a read-only pass such as perplexity) nothing is written.
    """

    def __init__(
        self,
        device: torch.device,
        reader: ShardReader,
        dtype: torch.dtype,
        writer: ShardWriter | None = None,
    ) -> None:
        super().__init__(device)
        self.reader, self.dtype, self.writer = reader, dtype, writer

    def fetch(self, step: LayerStep) -> None:
        for name in step.layer.state_dict():
            tensor = self.reader.get(f"{step.layer_name}.{name}")
            dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
            set_tensor(step.layer, name, tensor.to(self.device, dtype))

    def release(self, step: LayerStep, *, changed: bool) -> None:
        for name, tensor in step.layer.state_dict().items():
            if changed and self.writer is not None:
                self.writer.write(f"{step.layer_name}.{name}", tensor)
            set_tensor(step.layer, name, torch.empty_like(tensor, device="meta"))
        return_freed_memory()

    def finish(self, model: nn.Module) -> None:
        """Write the tensors outside the decoder layers and check that nothing is missing."""
        if self.writer is None:
            return
        layers_name, _ = find_decoder_layers(model)
        state = model.state_dict()
        for name in self.reader.names:
            if not name.startswith(layers_name + "."):
                self.writer.write(name, state[name])
        self.writer.close()
