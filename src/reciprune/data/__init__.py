"""Calibration and evaluation data: registry names, local files and embedded text → tokens."""

from reciprune.data.calibration import (
    DEFAULT_DATASET,
    REGISTRY,
    CalibrationData,
    load_calibration,
    load_eval_texts,
    token_stream,
)
from reciprune.data.embedded import embedded_calibration_texts, embedded_heldout_texts

__all__ = [
    "DEFAULT_DATASET",
    "REGISTRY",
    "CalibrationData",
    "embedded_calibration_texts",
    "embedded_heldout_texts",
    "load_calibration",
    "load_eval_texts",
    "token_stream",
]
