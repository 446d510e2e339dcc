"""The lifecycle session: owns the model, the modifiers, their hooks and the event stream."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reciprune.core.events import Event, EventType
from reciprune.core.reconstruction import ReconstructionProbe
from reciprune.core.statistics import InputStatistics

if TYPE_CHECKING:
    from reciprune.modifiers.base import Modifier

_ALWAYS_DISPATCHED = {EventType.INITIALIZE, EventType.FINALIZE}


@dataclass
class TrainingContext:
    """What a finetune pipeline gives its session for the modifiers' `on_prepare`."""

    #: The task loss of a batch on the current model (methods that score parameters first).
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    #: The first optimizer step's micro-batches.
    sample_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    #: With a 4-bit base (`load_in_4bit`): the NF4 backend that quantizes the frozen Linears
    #: after `on_prepare` (reciprune.core.nf4_base.NF4Backend), for modifiers that quantize
    #: their modules themselves; None for a full-precision base.
    base_quantization: Any = None


class LifecycleSession:
    """Applies a stage's modifiers to a model through events and hooks.

    Pipelines create one session per stage with its collaborators (a teacher, a training
    context, a reconstruction probe), call `initialize`, emit events with `event`, and call
    `finalize`, which removes every hook any modifier registered through the session. The
    training loop tells it the optimizer and step with `start_training` and `advance_to`.
    """

    def __init__(
        self,
        model: nn.Module,
        modifiers: Sequence[Modifier],
        *,
        teacher: nn.Module | None = None,
        total_steps: int | None = None,
        run_type: str = "oneshot",
        training: TrainingContext | None = None,
        probe: ReconstructionProbe | None = None,
    ) -> None:
        self.model = model
        self.modifiers = list(modifiers)
        self.teacher = teacher
        self.run_type = run_type
        self.training = training or TrainingContext()
        self.statistics = InputStatistics()
        self.probe = probe
        #: Per-module results modifiers report (sparsity, errors); they go into the manifest.
        self.records: dict[str, dict[str, Any]] = defaultdict(dict)
        self._hooks: dict[int, list[torch.utils.hooks.RemovableHandle]] = defaultdict(list)
        self._optimizer: torch.optim.Optimizer | None = None
        self._total_steps = total_steps
        self._global_step = 0
        self._prepared = False
        self._initialized = False
        self._finalized = False

    # training state (read-only for modifiers; the collaborators are in `training`) -------------
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer once training started, for modifiers that edit its state (e.g. the
        moments of re-chosen sparse deltas)."""
        return self._optimizer

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self._global_step

    def start_training(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the training loop once its optimizer exists (after `on_prepare`)."""
        self._optimizer = optimizer

    def advance_to(self, step: int) -> None:
        """Set the global step the next events carry."""
        self._global_step = step

    # lifecycle -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Each modifier's `on_prepare` (finetune stages: before sharding and the optimizer)."""
        if self._prepared or self._initialized:
            raise RuntimeError("prepare must be called once, before initialize")
        for modifier in self.modifiers:
            modifier.on_prepare(self)
        self._prepared = True

    def initialize(self) -> None:
        if self._initialized:
            raise RuntimeError("session already initialized")
        for modifier in self.modifiers:
            modifier.on_initialize(self)
        self._initialized = True
        self.event(EventType.INITIALIZE)

    def event(self, event_type: EventType, **fields: Any) -> Event:
        """Dispatch one event to the modifiers active at the current global step, in recipe order."""
        if not self._initialized or self._finalized:
            raise RuntimeError(f"event {event_type.value} outside an initialized, unfinalized session")
        event = Event(
            type=event_type, global_step=self.global_step, total_steps=self.total_steps, **fields
        )
        if event_type in (EventType.PROFILE_LAYER_END, EventType.LAYER_CALIBRATED):
            self.statistics.detach()
        if event_type == EventType.LAYER_CALIBRATED and self.probe is not None:
            self.probe.snapshot(self.statistics.tracked_modules())
        for modifier in self.modifiers:
            if event_type in _ALWAYS_DISPATCHED or modifier.is_active(
                self.global_step, self.total_steps
            ):
                modifier.on_event(self, event)
        if event_type == EventType.PROFILE_LAYER_START and event.layer is not None:
            self.statistics.attach(event.layer)
        elif event_type == EventType.PROFILE_LAYER_END:
            self.statistics.clear()
        elif event_type == EventType.LAYER_START and event.layer is not None:
            if self.probe is not None:
                self.probe.prepare(self.statistics)
            self.statistics.attach(event.layer)
        elif event_type == EventType.LAYER_CALIBRATED:
            if self.probe is not None:
                self.probe.measure(event, self.statistics, self.records)
            self.statistics.clear()
        return event

    def finalize(self) -> None:
        """FINALIZE event, each modifier's `on_finalize`, then every session hook removed."""
        if self._finalized:
            return
        self.event(EventType.FINALIZE)
        for modifier in self.modifiers:
            modifier.on_finalize(self)
        self.abort()

    def abort(self) -> None:
        """Remove every hook without further events: the run failed and is being unwound."""
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()
        self.statistics.clear()
        self._finalized = True

    # hooks -----------------------------------------------------------------------------------
    def register_hook(
        self,
        owner: object,
        module: nn.Module,
        fn: Callable[..., Any],
        *,
        kind: str = "forward",
    ) -> torch.utils.hooks.RemovableHandle:
        """Register a `forward` or `forward_pre` hook owned by `owner`."""
        if kind == "forward":
            handle = module.register_forward_hook(fn)
        elif kind == "forward_pre":
            handle = module.register_forward_pre_hook(fn)
        else:
            raise ValueError(f"unknown hook kind {kind!r}")
        self._hooks[id(owner)].append(handle)
        return handle

    def register_tensor_hook(
        self, owner: object, tensor: torch.Tensor, fn: Callable[[torch.Tensor], Any]
    ) -> torch.utils.hooks.RemovableHandle:
        """Register a gradient hook on a tensor (a parameter), removed at finalize."""
        handle = tensor.register_hook(fn)
        self._hooks[id(owner)].append(handle)
        return handle

    @property
    def num_hooks(self) -> int:
        return sum(len(h) for h in self._hooks.values())
