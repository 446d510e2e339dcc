"""The event stream that drives every modifier, in oneshot calibration and in training."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


class EventType(str, Enum):
    """Points in a run at which modifiers are called.

    PROFILE_* events come from a dense statistics pass that runs before calibration only when a
    modifier asks for one (`needs_profile`, e.g. OWL layer-wise sparsity).
    """

    INITIALIZE = "initialize"
    PROFILE_LAYER_START = "profile_layer_start"
    PROFILE_LAYER_END = "profile_layer_end"
    PROFILE_END = "profile_end"
    CALIBRATION_START = "calibration_start"
    LAYER_START = "layer_start"
    LAYER_CALIBRATED = "layer_calibrated"
    CALIBRATION_END = "calibration_end"
    BATCH_START = "batch_start"
    LOSS_COMPUTED = "loss_computed"
    OPTIMIZER_PRE_STEP = "optimizer_pre_step"
    OPTIMIZER_POST_STEP = "optimizer_post_step"
    BATCH_END = "batch_end"
    FINALIZE = "finalize"


@dataclass
class Event:
    """One event. `global_step` is on every event; the other fields depend on the type.

    For LOSS_COMPUTED a modifier may add a term to `loss` (``event.loss = event.loss + term``);
    the pipeline uses the value left on the event. Modifiers report the scalar parts of what they
    added in `metrics` (e.g. ``{"distill_loss": 0.31}``): the pipeline logs and averages them.
    In training, BATCH_START / LOSS_COMPUTED / BATCH_END come once per micro-batch with `batch`
    (``input_ids``, ``attention_mask``, ``labels``); OPTIMIZER_PRE_STEP (gradients ready, before
    clipping) and OPTIMIZER_POST_STEP once per optimizer step; `global_step` counts the optimizer
    steps already taken.
    """

    type: EventType
    global_step: int = 0
    total_steps: int | None = None
    layer_index: int | None = None
    layer_name: str | None = None
    layer: nn.Module | None = None
    loss: torch.Tensor | None = None
    batch: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)  # floats or 0-d tensors
