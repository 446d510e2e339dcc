"""The in-memory layer-wise pipeline: the whole model on one device, one layer's activations.

1. Run the model up to its first decoder layer on every calibration batch and keep that layer's
   inputs (hidden states and the keyword arguments the model passes: masks, position embeddings).
2. For each decoder layer: LAYER_START (modifiers ask for input statistics), forward every batch
   through the layer (hooks accumulate the statistics), LAYER_CALIBRATED (modifiers compress the
   layer), then forward again through the compressed layer to get the next layer's inputs.
No tracing, nothing model-specific beyond finding the layers list. Subclasses move each layer
to the execution device and back (`onload`/`offload`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reciprune.core.events import EventType
from reciprune.core.layers import find_decoder_layers
from reciprune.core.session import LifecycleSession
from reciprune.errors import ReciPruneError
from reciprune.pipelines.calibration.base import Batch, CalibrationPipeline, LayerStep


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


@dataclass
class LayerInputs:
    """Positional hidden states and keyword arguments of one calibration batch at a decoder layer."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples) moved to `device`; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


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
        extra = {k: _detach(v) for k, v in kwargs.items()}
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


def _layer_output(output: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older ones and GPT-2/OPT return tuples.
    return output[0] if isinstance(output, tuple | list) else output


class LayerwisePipeline(CalibrationPipeline):
    """The model stays where it is (one device); activations are kept per layer."""

    name = "layerwise"

    # where things live (overridden by pipelines that move layers) --------------------------
    def execution_device(self, model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def storage_device(self, model: nn.Module, inputs: list[LayerInputs]) -> torch.device:
        """Where to keep the calibration activations between layers: on the accelerator when
        they (twice: inputs and outputs) fit in half its free memory, else in CPU memory."""
        device = self.execution_device(model)
        if device.type != "cuda" or not inputs:
            return device
        needed = 2 * sum(item.hidden.numel() * item.hidden.element_size() for item in inputs)
        free, _total = torch.cuda.mem_get_info(device)
        return device if needed < free / 2 else torch.device("cpu")

    def capture(self, model: nn.Module, batches: list[Batch]) -> list[LayerInputs]:
        """The first decoder layer's inputs of every batch."""
        t0 = time.perf_counter()
        first = find_decoder_layers(model)[1][0]
        inputs = capture_layer_inputs(model, first, batches, self.execution_device(model))
        self.timed("capture", t0)
        return inputs

    def onload(self, step: LayerStep) -> None:
        """Make the layer ready to run on the execution device (subclasses move it)."""

    def offload(self, step: LayerStep) -> None:
        """Put the compressed layer back where it is kept."""

    @torch.no_grad()
    def forward(
        self, step: LayerStep, inputs: list[LayerInputs], *, propagate: bool, storage: torch.device
    ) -> None:
        """Every batch through the layer; with `propagate` its outputs become the next inputs."""
        device = self.execution_device(step.layer)
        for item in inputs:
            kwargs = {k: to_device(v, device) for k, v in item.kwargs.items()}
            output = step.layer(item.hidden.to(device), **kwargs)
            if propagate:
                item.hidden = _layer_output(output).to(storage)

    # the walk ----------------------------------------------------------------------------
    def calibrate(self, session: LifecycleSession, batches: list[Batch] | None) -> None:
        model = session.model
        modifiers = session.modifiers
        if any(m.requires_data for m in modifiers) and not batches:
            raise ReciPruneError(
                "this stage's modifiers need calibration data but none was given; pass --dataset "
                "(or keep the embedded default) and --num-calibration-samples > 0"
            )
        inputs = self.capture(model, batches or [])
        storage = self.storage_device(model, inputs)
        if any(m.needs_profile for m in modifiers):
            # A dense statistics pass first: layer-wise profiles (OWL) need every layer's
            # statistics before the first layer is compressed.
            self.walk(session, inputs, storage, profile=True)
            session.event(EventType.PROFILE_END)
            inputs = self.capture(model, batches or [])
        session.event(EventType.CALIBRATION_START)
        self.walk(session, inputs, storage, profile=False)
        session.event(EventType.CALIBRATION_END)

    def walk(
        self,
        session: LifecycleSession,
        inputs: list[LayerInputs],
        storage: torch.device,
        *,
        profile: bool,
    ) -> None:
        """One pass over the layers: statistics, compression (unless `profile`), propagation."""
        for item in inputs:
            item.hidden = item.hidden.to(storage)
        for key in ("profile",) if profile else ("calibration_forward", "compress", "propagate"):
            self.timings.setdefault(key, 0.0)
        for step in self.layer_steps(session.model, " (profile)" if profile else ""):
            self.onload(step)
            t0 = time.perf_counter()
            if profile:  # statistics and the next layer's inputs from one forward
                session.event(EventType.PROFILE_LAYER_START, **vars(step))
                self.forward(step, inputs, propagate=True, storage=storage)
                session.event(EventType.PROFILE_LAYER_END, **vars(step))
                self.timed("profile", t0)
            else:
                session.event(EventType.LAYER_START, **vars(step))
                if session.statistics.tracking:
                    self.forward(step, inputs, propagate=False, storage=storage)
                t0 = self.timed("calibration_forward", t0)
                session.event(EventType.LAYER_CALIBRATED, **vars(step))
                t0 = self.timed("compress", t0)
                self.forward(step, inputs, propagate=True, storage=storage)
                self.timed("propagate", t0)
            self.offload(step)
