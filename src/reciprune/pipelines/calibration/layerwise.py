"""The in-memory layer-wise pipeline: the whole model on one device, one layer's activations.

1. Run the model up to its first decoder layer on every calibration batch and keep that layer's
   inputs (hidden states and the keyword arguments the model passes: masks, position embeddings).
2. For each decoder layer: LAYER_START (modifiers ask for input statistics), forward every batch
   through the layer (hooks accumulate the statistics), LAYER_CALIBRATED (modifiers compress the
   layer), then forward again through the compressed layer to get the next layer's inputs.
No tracing, nothing model-specific beyond finding the layers list. Where each layer lives and
runs is its placement's business (`placement.py`): in memory, onloaded, or streamed from disk.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from reciprune.core.events import EventType
from reciprune.core.layer_io import (
    LayerInputs,
    capture_layer_inputs,
    layer_output,
    store_activations,
    to_device,
)
from reciprune.core.layers import find_decoder_layers
from reciprune.core.session import LifecycleSession
from reciprune.errors import ReciPruneError
from reciprune.pipelines.calibration.base import Batch, CalibrationPipeline, LayerStep


class LayerwisePipeline(CalibrationPipeline):
    """The model stays where it is (one device); activations are kept per layer."""

    name = "layerwise"
    placement_kind = "memory"

    def storage_device(self, inputs: list[LayerInputs]) -> torch.device:
        """Where to keep the calibration activations between layers: on the accelerator when
        they (twice: inputs and outputs) fit in half its free memory, else in (pinned) CPU
        memory."""
        device = self.placement.device
        if device.type != "cuda" or not inputs:
            return device
        needed = 2 * sum(item.hidden.numel() * item.hidden.element_size() for item in inputs)
        free, _total = torch.cuda.mem_get_info(device)
        return device if needed < free / 2 else torch.device("cpu")

    def capture(self, model: nn.Module, batches: list[Batch]) -> list[LayerInputs]:
        """The first decoder layer's inputs of every batch."""
        t0 = time.perf_counter()
        first = find_decoder_layers(model)[1][0]
        with self.placement.outer_on_device(model):
            inputs = capture_layer_inputs(model, first, batches, self.placement.device)
        self.timed("capture", t0)
        return inputs

    @torch.no_grad()
    def forward(
        self, step: LayerStep, inputs: list[LayerInputs], *, propagate: bool, storage: torch.device
    ) -> None:
        """Every batch through the layer; with `propagate` its outputs become the next inputs."""
        device = self.placement.device
        for item in inputs:
            kwargs = {k: to_device(v, device) for k, v in item.kwargs.items()}
            output = _finite(layer_output(step.layer(item.hidden.to(device, non_blocking=True),
                                                     **kwargs)), step)  # fmt: skip
            if propagate:
                item.hidden = store_activations(output, storage)

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
        storage = self.storage_device(inputs)
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
            t0 = time.perf_counter()
            self.placement.fetch(step)
            self.check_finite_weights(step)
            t0 = self.timed("onload", t0)
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
                t0 = self.timed("propagate", t0)
            self.placement.release(step, changed=not profile)
            self.timed("offload", t0)


def _finite(hidden: torch.Tensor, step: LayerStep) -> torch.Tensor:
    # Finite weights can still overflow (fp16, huge inputs); the next layer would compress on NaN.
    if not bool(torch.isfinite(hidden).all()):
        raise ReciPruneError(
            f"{step.layer_name} produced non-finite (NaN or Inf) activations on the calibration data. "
            "Use --dtype float32 or bfloat16 if the model runs in float16, or check the model "
            "with `reciprune eval` before compressing it."
        )
    return hidden
