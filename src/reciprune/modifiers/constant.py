"""ConstantPruningModifier: keep the zeros a model already has, through training."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from reciprune.core.events import Event, EventType
from reciprune.modifiers.pruning import TargetedModifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class ConstantPruningModifier(TargetedModifier):
    """Hold the current sparsity mask fixed: gradients of pruned weights are zeroed and weights re-masked after every optimizer step.

    The mask is taken from the targeted weights' zeros when the stage starts (the output of a
    previous pruning stage), so a sparse model stays exactly as sparse while it fine-tunes.
    """

    needs_calibration: ClassVar[bool] = False
    run_types: ClassVar[tuple[str, ...]] = ("oneshot", "finetune")
    paper: ClassVar[str] = "SparseML ConstantPruningModifier (Kurtic et al., 'Sparse Fine-tuning "
    "for Inference Acceleration of Large Language Models', 2023)"
    legacy_fields: ClassVar[dict[str, str | None]] = {"params": "targets"}

    def on_initialize(self, session: LifecycleSession) -> None:
        super().on_initialize(session)
        self._masks: dict[str, torch.Tensor] = {}
        for name, module in self.targeted_modules().items():
            mask = module.weight.data != 0
            self._masks[name] = mask
            session.records[name].update(mask_sparsity=1.0 - mask.float().mean().item())
            if module.weight.requires_grad:
                session.register_tensor_hook(self, module.weight, lambda g, k=mask: g * k)

    def masks(self) -> dict[str, torch.Tensor]:
        """The held masks, by module name, in the parameters' own layout."""
        return dict(self._masks)

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        if event.type != EventType.OPTIMIZER_POST_STEP:
            return
        with torch.no_grad():
            for name, module in self.targeted_modules().items():
                module.weight.data.mul_(self._masks[name])

    def on_finalize(self, session: LifecycleSession) -> None:
        with torch.no_grad():
            for name, module in self.targeted_modules().items():
                module.weight.data.mul_(self._masks[name])
