"""The lifecycle session: owns the model, the modifiers, their hooks and the event stream."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reciprune.algorithms.reconstruction import output_error
from reciprune.core.events import Event, EventType
from reciprune.core.statistics import InputStatistics
from reciprune.core.targets import weight_matrix

if TYPE_CHECKING:
    from reciprune.modifiers.base import Modifier

_ALWAYS_DISPATCHED = {EventType.INITIALIZE, EventType.FINALIZE}


class LifecycleSession:
    """Applies a stage's modifiers to a model through events and hooks.

    Pipelines create one session per stage, call `initialize`, emit events with `event`, and
    call `finalize`, which removes every hook any modifier registered through the session.
    """

    def __init__(
        self,
        model: nn.Module,
        modifiers: Sequence[Modifier],
        *,
        teacher: nn.Module | None = None,
        total_steps: int | None = None,
        run_type: str = "oneshot",
        measure_reconstruction: bool = True,
    ) -> None:
        self.model = model
        self.modifiers = list(modifiers)
        self.teacher = teacher
        self.total_steps = total_steps
        self.run_type = run_type
        self.global_step = 0
        self.statistics = InputStatistics()
        #: Record ‖WX − W'X‖² / ‖WX‖² of every module compressed during calibration.
        self.measure_reconstruction = measure_reconstruction
        self._weights_before: dict[nn.Module, torch.Tensor] = {}
        #: Per-module results modifiers report (sparsity, errors); they go into the manifest.
        self.records: dict[str, dict[str, Any]] = defaultdict(dict)
        self._hooks: dict[int, list[torch.utils.hooks.RemovableHandle]] = defaultdict(list)
        #: Finetune stages: the first optimizer step's micro-batches, for `on_prepare`.
        self.sample_batches: list[dict[str, torch.Tensor]] = []
        #: Finetune stages: the task loss of a batch on the current model, for `on_prepare`.
        self.loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
        #: Finetune stages: the optimizer, set by the trainer once built (after `on_prepare`),
        #: for modifiers that edit its state (e.g. the moments of re-chosen sparse deltas).
        self.optimizer: torch.optim.Optimizer | None = None
        #: Finetune stages with a 4-bit base (`load_in_4bit`): the NF4 backend that quantizes the
        #: frozen Linears after `on_prepare`, for modifiers that quantize their modules themselves
        #: (reciprune.core.nf4_base.NF4Backend); None for a full-precision base.
        self.base_quantization: Any = None
        self._prepared = False
        self._initialized = False
        self._finalized = False

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
        if event_type == EventType.PROFILE_LAYER_END:
            self.statistics.detach()
        if event_type == EventType.LAYER_CALIBRATED:
            self.statistics.detach()
            # Modifiers that refine an earlier modifier's mask (DSnoT) need the dense weights.
            self._weights_before = {
                module: weight_matrix(module).detach().clone()
                for module in self.statistics.tracked_modules()
            }
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
            if self.measure_reconstruction:
                self.statistics.require_hessians()
            self.statistics.attach(event.layer)
        elif event_type == EventType.LAYER_CALIBRATED:
            self._record_reconstruction(event)
            self.statistics.clear()
        return event

    def weight_before(self, module: nn.Module) -> torch.Tensor:
        """`module`'s [out, in] weight as it was when this layer's calibration ended, before
        any modifier compressed it (valid during LAYER_CALIBRATED)."""
        try:
            return self._weights_before[module]
        except KeyError:
            raise RuntimeError(
                "weight_before is only known during LAYER_CALIBRATED for tracked modules"
            ) from None

    def _record_reconstruction(self, event: Event) -> None:
        """Relative output error of each module changed at this layer, from its input XᵀX.

        ‖(W − W')X‖² = tr(ΔW XᵀX ΔWᵀ), so no extra forward pass is needed.
        """
        if not self.measure_reconstruction or not self._weights_before or event.layer is None:
            self._weights_before = {}
            return
        names = {module: name for name, module in event.layer.named_modules()}
        for module, before in self._weights_before.items():
            delta = before.float() - weight_matrix(module).float()
            if not bool(delta.any()):
                continue
            xtx = self.statistics.hessian(module)
            error, reference = output_error(delta, xtx), output_error(before, xtx)
            name = f"{event.layer_name}.{names[module]}" if event.layer_name else names[module]
            self.records[name]["reconstruction_error"] = error / max(reference, 1e-30)
        self._weights_before = {}

    def finalize(self) -> None:
        """FINALIZE event, each modifier's `on_finalize`, then every session hook removed."""
        if self._finalized:
            return
        self.event(EventType.FINALIZE)
        for modifier in self.modifiers:
            modifier.on_finalize(self)
        self.remove_hooks()
        self.statistics.clear()
        self._finalized = True

    def abort(self) -> None:
        """Remove every hook without further events: the run failed and is being unwound."""
        self.remove_hooks()
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
        with_kwargs: bool = False,
    ) -> torch.utils.hooks.RemovableHandle:
        """Register a `forward`, `forward_pre` or `full_backward` hook owned by `owner`."""
        if kind == "forward":
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        elif kind == "forward_pre":
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        elif kind == "full_backward":
            handle = module.register_full_backward_hook(fn)
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

    def remove_hooks(self, owner: object | None = None) -> None:
        """Remove the hooks of one owner, or all of them."""
        keys = list(self._hooks) if owner is None else [id(owner)]
        for key in keys:
            for handle in self._hooks.pop(key, []):
                handle.remove()

    @property
    def num_hooks(self) -> int:
        return sum(len(h) for h in self._hooks.values())
