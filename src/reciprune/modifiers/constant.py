"""ConstantPruningModifier: keep the zeros a model already has, through training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from reciprune.core.distributed import local_tensor
from reciprune.core.events import Event, EventType
from reciprune.modifiers.registry import register_modifier
from reciprune.modifiers.targeted import TargetedModifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class ConstantPruningModifier(TargetedModifier):
    """Hold the current sparsity mask fixed: gradients of pruned weights are zeroed and weights re-masked after every optimizer step.

    The mask is taken from the targeted weights' zeros when the stage starts (the output of a
    previous pruning stage), so a sparse model stays exactly as sparse while it fine-tunes.
    Under FSDP each process masks its own shard of each weight and of its gradient.
    """

    run_types: ClassVar[tuple[str, ...]] = ("oneshot", "finetune")
    produces: ClassVar[frozenset[str]] = frozenset({"sparsity"})
    paper: ClassVar[str] = "SparseML ConstantPruningModifier (Kurtic et al., 'Sparse Fine-tuning "
    "for Inference Acceleration of Large Language Models', 2023)"
    legacy_fields: ClassVar[dict[str, str | None]] = {"params": "targets"}

    def on_initialize(self, session: LifecycleSession) -> None:
        super().on_initialize(session)
        self._masks: dict[str, torch.Tensor] = {}
        for name, module in self.targeted_modules().items():
            mask = local_tensor(module.weight.data) != 0
            self._masks[name] = mask
            session.records[name].update(mask_sparsity=1.0 - mask.float().mean().item())

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        if event.type == EventType.OPTIMIZER_PRE_STEP:
            # Masked gradients keep pruned weights out of the clipping norm and Adam's moments.
            for name, module in self.targeted_modules().items():
                if module.weight.grad is not None:
                    local_tensor(module.weight.grad).mul_(self._masks[name])
        elif event.type == EventType.OPTIMIZER_POST_STEP:
            self._apply_masks()

    def on_finalize(self, session: LifecycleSession) -> None:
        self._apply_masks()

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for name, module in self.targeted_modules().items():
                local_tensor(module.weight.data).mul_(self._masks[name])

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.clone() for name, mask in self._masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state.get("masks", {})
        missing = sorted(set(self._masks) - set(masks))
        if missing:
            raise ValueError(f"saved ConstantPruningModifier state lacks masks for {missing[:3]}")
        for name in self._masks:
            self._masks[name] = masks[name].to(self._masks[name].device, torch.bool)


def keeps_base_zeros(mask_base_zeros: bool | None, session: LifecycleSession) -> bool:
    """A delta modifier's `mask_base_zeros` setting resolved: unset means on when the stage has
    a ConstantPruningModifier (its base is sparse and must stay so)."""
    if mask_base_zeros is not None:
        return mask_base_zeros
    return any(isinstance(m, ConstantPruningModifier) for m in session.modifiers)
