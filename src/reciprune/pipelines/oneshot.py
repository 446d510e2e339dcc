"""Layer-by-layer oneshot calibration: one decoder layer's activations in memory at a time.

1. Run the model up to its first decoder layer on every calibration batch and keep that layer's
   inputs (hidden states and the keyword arguments the model passes: masks, position embeddings).
2. For each decoder layer: LAYER_START (modifiers ask for input statistics), forward every batch
   through the layer (hooks accumulate the statistics), LAYER_CALIBRATED (modifiers compress the
   layer), then forward again through the compressed layer to get the next layer's inputs.
No tracing, nothing model-specific beyond finding the layers list.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from reciprune.core.events import EventType
from reciprune.core.layers import find_decoder_layers
from reciprune.core.session import LifecycleSession
from reciprune.errors import ReciPruneError
from reciprune.modifiers.base import Modifier


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


@dataclass
class LayerInputs:
    """Positional hidden states and keyword arguments of one calibration batch at a decoder layer."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@dataclass
class OneshotResult:
    """What a oneshot stage did: the session's per-module records and timings (seconds)."""

    records: dict[str, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> list[LayerInputs]:
    """Run `model` on each batch only as far as `first_layer` and record that layer's inputs."""
    captured: list[LayerInputs] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = {k: _detach(v) for k, v in kwargs.items()}
        captured.append(LayerInputs(hidden.detach(), extra))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for batch in batches:
            try:
                model(**{k: _to(v, device) for k, v in batch.items()}, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def activation_storage(model: nn.Module, inputs: list[LayerInputs]) -> torch.device:
    """Where to keep the calibration activations between layers: on the model's accelerator
    when they (twice: inputs and outputs) fit in half its free memory, else in CPU memory."""
    device = next(model.parameters()).device
    if device.type != "cuda" or not inputs:
        return device
    needed = 2 * sum(item.hidden.numel() * item.hidden.element_size() for item in inputs)
    free, _total = torch.cuda.mem_get_info(device)
    return device if needed < free / 2 else torch.device("cpu")


def _layer_output(output: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older ones and GPT-2/OPT return tuples.
    return output[0] if isinstance(output, tuple | list) else output


def run_oneshot(
    model: nn.Module,
    modifiers: list[Modifier],
    batches: list[dict[str, torch.Tensor]] | None,
    *,
    progress: bool = True,
    description: str = "oneshot",
) -> OneshotResult:
    """Apply oneshot `modifiers` to `model` layer by layer over the calibration `batches`."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    session = LifecycleSession(model, modifiers, run_type="oneshot")
    session.initialize()
    needs_data = any(m.requires_data for m in modifiers)
    if needs_data and not batches:
        raise ReciPruneError(
            "this stage's modifiers need calibration data but none was given; pass --dataset "
            "(or keep the embedded default) and --num-calibration-samples > 0"
        )
    layers_name, layers = find_decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs: list[LayerInputs] = []
        storage = device

        def capture() -> list[LayerInputs]:
            t0 = time.perf_counter()
            captured = capture_layer_inputs(model, layers[0], batches or [])
            timings["capture"] = timings.get("capture", 0.0) + time.perf_counter() - t0
            for item in captured:
                item.hidden = item.hidden.to(storage)
            return captured

        if needs_data:
            inputs = capture()
            storage = activation_storage(model, inputs)
            for item in inputs:
                item.hidden = item.hidden.to(storage)
        if any(m.needs_profile for m in modifiers):
            # A dense statistics pass first: layer-wise profiles (OWL) need every layer's
            # statistics before the first layer is compressed.
            t0 = time.perf_counter()
            profile_bar = tqdm(
                list(enumerate(layers)),
                desc=f"{description} (profile)",
                unit="layer",
                disable=not progress,
            )
            for index, layer in profile_bar:
                fields = {"layer_index": index, "layer_name": f"{layers_name}.{index}", "layer": layer}
                session.event(EventType.PROFILE_LAYER_START, **fields)
                with torch.no_grad():
                    for item in inputs:
                        output = _layer_output(layer(item.hidden.to(device), **item.kwargs))
                        item.hidden = output.to(storage)
                session.event(EventType.PROFILE_LAYER_END, **fields)
            session.event(EventType.PROFILE_END)
            timings["profile"] = time.perf_counter() - t0
            inputs = capture()
        session.event(EventType.CALIBRATION_START)
        timings.update(calibration_forward=0.0, compress=0.0, propagate=0.0)
        bar = tqdm(
            list(enumerate(layers)), desc=description, unit="layer", disable=not progress, leave=True
        )
        for index, layer in bar:
            fields = {"layer_index": index, "layer_name": f"{layers_name}.{index}", "layer": layer}
            session.event(EventType.LAYER_START, **fields)
            t0 = time.perf_counter()
            if session.statistics.tracking:
                with torch.no_grad():
                    for item in inputs:
                        layer(item.hidden.to(device), **item.kwargs)
            t1 = time.perf_counter()
            session.event(EventType.LAYER_CALIBRATED, **fields)
            t2 = time.perf_counter()
            with torch.no_grad():
                for item in inputs:
                    output = _layer_output(layer(item.hidden.to(device), **item.kwargs))
                    item.hidden = output.to(storage)
            t3 = time.perf_counter()
            timings["calibration_forward"] += t1 - t0
            timings["compress"] += t2 - t1
            timings["propagate"] += t3 - t2
        session.event(EventType.CALIBRATION_END)
        session.finalize()
    except BaseException:
        session.abort()
        raise
    finally:
        model.train(was_training)
    timings["total"] = time.perf_counter() - started
    return OneshotResult(records=dict(session.records), timings=timings)
