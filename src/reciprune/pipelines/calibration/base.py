"""The calibration-pipeline interface: how a oneshot stage walks the model.

Every pipeline emits the same events to the same session, so modifiers never know which one
runs them: CALIBRATION_START → per decoder layer LAYER_START (modifiers ask for statistics),
a statistics forward, LAYER_CALIBRATED (modifiers compress the layer), propagation of the
calibration activations through the compressed layer → CALIBRATION_END. A pipeline decides
where the layer and its activations live while that happens and how they get there.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from reciprune.core.layer_io import LayerStep
from reciprune.core.layers import eval_mode, find_decoder_layers
from reciprune.core.placement import InMemory
from reciprune.core.reconstruction import ReconstructionProbe
from reciprune.core.session import LifecycleSession
from reciprune.errors import ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.progress import progress_bar

Batch = dict[str, torch.Tensor]


@dataclass
class OneshotResult:
    """What a oneshot stage did: the session's per-module records and timings (seconds)."""

    records: dict[str, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)


class CalibrationPipeline(ABC):
    """Runs a oneshot stage's modifiers over a model; subclasses walk the layers."""

    name: ClassVar[str]
    #: Where it keeps layers: "memory" (where the model is), "onload" (CPU memory, moved to the
    #: device one at a time) or "stream" (read from and written to safetensors files).
    placement_kind: ClassVar[str]

    def __init__(
        self,
        *,
        progress: bool = True,
        description: str = "oneshot",
        placement: Any = None,
        exact_error: bool = False,
    ) -> None:
        self.progress = progress
        self.description = description
        #: Accumulate a full XᵀX for every module so the report's errors are exact.
        self.exact_error = exact_error
        #: Where layers live and run (`placement.InMemory` for the model's device when None).
        self.placement = placement
        self.timings: dict[str, float] = {}

    @classmethod
    def supports(cls, modifiers: list[Modifier]) -> bool:
        """Whether this pipeline can run these modifiers."""
        return True

    def run(
        self, model: nn.Module, modifiers: list[Modifier], batches: list[Batch] | None
    ) -> OneshotResult:
        """Apply `modifiers` to `model` (in place) over the calibration `batches`."""
        started = time.perf_counter()
        self.timings = {}
        if self.placement is None:
            self.placement = InMemory(model)
        probe = ReconstructionProbe(exact=self.exact_error)
        session = LifecycleSession(model, modifiers, run_type="oneshot", probe=probe)
        session.initialize()
        with eval_mode(model):
            try:
                self.calibrate(session, batches)
                session.finalize()
            except BaseException:
                session.abort()
                raise
        self.timings["total"] = time.perf_counter() - started
        return OneshotResult(records=dict(session.records), timings=dict(self.timings))

    @abstractmethod
    def calibrate(self, session: LifecycleSession, batches: list[Batch] | None) -> None:
        """Emit the calibration events for every decoder layer of `session.model`."""

    def layer_steps(self, model: nn.Module, label: str = "") -> Iterator[LayerStep]:
        """The decoder layers in order, behind a progress bar."""
        layers_name, layers = find_decoder_layers(model)
        bar = progress_bar(list(enumerate(layers)), desc=f"{self.description}{label}",
                           unit="layer", progress=self.progress)  # fmt: skip
        for index, layer in bar:
            yield LayerStep(index, f"{layers_name}.{index}", layer)

    @staticmethod
    def check_finite_weights(step: LayerStep) -> None:
        """Refuse a layer whose weights hold NaN or Inf: the Hessian's Cholesky fails on them, or
        worse, compression succeeds and saves a model that outputs NaN."""
        for name, param in step.layer.named_parameters():
            if param.device.type != "meta" and not bool(torch.isfinite(param).all()):
                bad = int((~torch.isfinite(param)).sum())
                raise ReciPruneError(
                    f"{step.layer_name}.{name} has {bad} non-finite (NaN or Inf) values in the model's "
                    "weights; compressing it would give a NaN model. Repair or re-download the "
                    "checkpoint, or add that module to the modifier's `ignore:` list."
                )

    def timed(self, key: str, since: float) -> float:
        """Add the seconds since `since` to timings[key]; returns now."""
        now = time.perf_counter()
        self.timings[key] = self.timings.get(key, 0.0) + now - since
        return now
