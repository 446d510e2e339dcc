"""A decoder layer's inputs and outputs, captured and moved between layers.

`capture_layer_inputs` runs a model only as far as its first decoder layer and records what that
layer receives (hidden states and the keyword arguments the model passes: masks, position
embeddings), so every later layer can be run on its own, by any pipeline or evaluation that
walks the model layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class LayerStep:
    """One decoder layer as events carry it (`vars(step)` are the event's layer fields)."""

    layer_index: int
    layer_name: str
    layer: nn.Module


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


@dataclass
class LayerInputs:
    """Positional hidden states and keyword arguments of one calibration batch at a decoder layer."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` of every tensor in `value` (also inside tuples); anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples) moved to `device`; anything else unchanged."""
    return _map_tensors(value, lambda t: t.to(device, non_blocking=True))


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    first_layer: nn.Module,
    batches: Iterable[Batch],
    device: torch.device | None = None,
) -> list[LayerInputs]:
    """Run `model` on each batch only as far as `first_layer` and record that layer's inputs."""
    captured: list[LayerInputs] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = {k: _map_tensors(v, torch.Tensor.detach) for k, v in kwargs.items()}
        captured.append(LayerInputs(hidden.detach(), extra))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = device or next(model.parameters()).device
        for batch in batches:
            try:
                model(**{k: to_device(v, device) for k, v in batch.items()}, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def store_activations(hidden: torch.Tensor, storage: torch.device) -> torch.Tensor:
    """`hidden` where activations are kept; GPU activations kept on the CPU go to pinned memory,
    so the next layer's copy back is asynchronous."""
    if storage.type == "cpu" and hidden.is_cuda:
        return torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(hidden)
    return hidden.to(storage)


def layer_output(output: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older ones and GPT-2/OPT return tuples.
    return output[0] if isinstance(output, tuple | list) else output


class _Passthrough(nn.Module):
    """Stands in for a decoder layer: returns its input (the last one: the given hidden states),
    shaped as the real layers' outputs are (a tensor, or a tuple for GPT-2/OPT style layers)."""

    def __init__(self, final: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.final, self.as_tuple = final, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.final.to(hidden_states.device) if self.final is not None else hidden_states
        return (out,) if self.as_tuple else out


@contextmanager
def layers_swapped(model: nn.Module, stand_ins: list[nn.Module] | None = None) -> Iterator[None]:
    """The decoder layers taken out of the model for the duration, replaced by `stand_ins`
    (none: an empty list, so `model.to(...)` moves only the modules around the layers)."""
    from reciprune.core.layers import find_decoder_layers

    layers_name, layers = find_decoder_layers(model)
    parent_name, _, attribute = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList(stand_ins or []))
    try:
        yield
    finally:
        setattr(parent, attribute, layers)


def layers_replaced(model: nn.Module, count: int, final: torch.Tensor, as_tuple: bool):
    """The `count` decoder layers swapped for pass-throughs whose last returns `final`, so a
    forward pass runs only the modules around the layers (embeddings, final norm, head) on it."""
    stand_ins = [_Passthrough(final if i == count - 1 else None, as_tuple) for i in range(count)]
    return layers_swapped(model, stand_ins)
