"""Calibration pipelines: how a oneshot stage walks the model (see `base`).

`select_pipeline` picks one by name; `auto_pipeline` says which one "auto" means for a model,
its modifiers and the machine. Each pipeline is a walk (data-free or layer-wise) with a
placement kind (`reciprune.core.placement`): in memory, onloaded, or streamed from disk.
"""

from __future__ import annotations

from reciprune.core.layer_io import LayerInputs, capture_layer_inputs
from reciprune.errors import ReciPruneError
from reciprune.modifiers.base import Modifier
from reciprune.pipelines.calibration.base import CalibrationPipeline, LayerStep, OneshotResult
from reciprune.pipelines.calibration.data_free import DataFreePipeline
from reciprune.pipelines.calibration.layerwise import LayerwisePipeline
from reciprune.pipelines.calibration.sequential import SequentialPipeline
from reciprune.pipelines.calibration.streaming import StreamingPipeline

PIPELINES: dict[str, type[CalibrationPipeline]] = {
    cls.name: cls
    for cls in (DataFreePipeline, LayerwisePipeline, SequentialPipeline, StreamingPipeline)
}
__all__ = ["CalibrationPipeline", "LayerInputs", "LayerStep", "OneshotResult", "PIPELINES",
           "auto_pipeline", "capture_layer_inputs", "select_pipeline"]  # fmt: skip


def auto_pipeline(modifiers: list[Modifier], *, gpu: bool, fits_in_memory: bool) -> str:
    """The pipeline "auto" means: streaming when the weights would not fit in memory,
    sequential onloading on a GPU, data-free when no modifier reads data, else layer-wise."""
    if not fits_in_memory:
        return "streaming"
    if gpu:
        return "sequential"
    return "data_free" if DataFreePipeline.supports(modifiers) else "layerwise"


def select_pipeline(modifiers: list[Modifier], name: str = "auto") -> type[CalibrationPipeline]:
    """The pipeline class called `name` ("auto": data-free or layer-wise, in memory)."""
    if name == "auto":
        name = auto_pipeline(modifiers, gpu=False, fits_in_memory=True)
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
