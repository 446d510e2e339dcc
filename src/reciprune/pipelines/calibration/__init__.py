"""Calibration pipelines: how a oneshot stage walks the model (see `base`).

`select_pipeline` picks one by name, or ("auto") the first in `PIPELINES` that supports the
stage's modifiers: data-free when no modifier reads calibration data, else layer-wise.
"""

from __future__ import annotations

from reciprune.errors import ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.pipelines.calibration.base import CalibrationPipeline, LayerStep, OneshotResult
from reciprune.pipelines.calibration.data_free import DataFreePipeline
from reciprune.pipelines.calibration.layerwise import (
    LayerInputs,
    LayerwisePipeline,
    capture_layer_inputs,
)

PIPELINES: dict[str, type[CalibrationPipeline]] = {
    cls.name: cls for cls in (DataFreePipeline, LayerwisePipeline)
}
__all__ = ["CalibrationPipeline", "LayerInputs", "LayerStep", "OneshotResult", "PIPELINES",
           "capture_layer_inputs", "select_pipeline"]  # fmt: skip


def select_pipeline(modifiers: list[Modifier], name: str = "auto") -> type[CalibrationPipeline]:
    """The pipeline class called `name`, or the first that supports `modifiers` ("auto")."""
    if name == "auto":
        return next(cls for cls in PIPELINES.values() if cls.supports(modifiers))
    if name not in PIPELINES:
        raise ReciPruneError(
            f"unknown calibration pipeline {name!r}; choose one of: auto, {', '.join(PIPELINES)}."
        )
    if not PIPELINES[name].supports(modifiers):
        raise ReciPruneError(
            f"the {name} pipeline cannot run {', '.join(m.type_name() for m in modifiers)} (they "
            "need calibration data); use --pipeline auto."
        )
    return PIPELINES[name]
