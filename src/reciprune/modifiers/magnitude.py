"""MagnitudePruningModifier: prune the smallest weights, at once or on a cubic schedule in training."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import nn

from reciprune.algorithms.magnitude import cubic_sparsity, magnitude_prune
from reciprune.algorithms.masks import parse_mask_structure
from reciprune.core.events import Event, EventType
from reciprune.core.targets import set_weight_matrix, weight_matrix
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class MagnitudePruningModifier(PruningModifier):
    """Prune the weights of smallest |W| (one threshold per matrix); gradual and cubic in training.

    Oneshot: each targeted matrix is pruned to `sparsity` with no calibration data. Finetune:
    sparsity rises from `init_sparsity` at `start` to `sparsity` at `end` on the cubic schedule
    of Zhu & Gupta (2017), masks recomputed every `update_frequency` steps and re-applied after
    every optimizer step; after `end` the final mask is held.
    """

    init_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="Sparsity at `start` in training.")
    update_frequency: int = Field(
        1, gt=0, description="Optimizer steps between mask updates while the schedule runs."
    )

    needs_calibration: ClassVar[bool] = False
    run_types: ClassVar[tuple[str, ...]] = ("oneshot", "finetune")
    paper: ClassVar[str] = (
        "Zhu & Gupta, 'To prune, or not to prune: exploring the efficacy of pruning for model "
        "compression', 2017 (schedule); Han et al., 2015 (magnitude pruning)"
    )
    legacy_fields: ClassVar[dict[str, str | None]] = {
        **PruningModifier.legacy_fields,
        "update_frequency_steps": "update_frequency",
    }

    def is_active(self, global_step: int, total_steps: int | None = None) -> bool:
        # `end` closes the schedule, not the modifier: the final mask is held afterwards.
        return self.start is None or global_step >= self._resolve_step(self.start, total_steps)

    def prune_module(
        self, session: LifecycleSession, module: nn.Module, sparsity: float, n: int, m: int
    ) -> torch.Tensor:
        W, keep = magnitude_prune(weight_matrix(module), sparsity, n=n, m=m)
        set_weight_matrix(module, W)
        return keep

    def on_event(self, session: LifecycleSession, event: Event) -> None:
        if session.run_type == "oneshot":
            super().on_event(session, event)
            return
        if event.type != EventType.OPTIMIZER_POST_STEP:
            return
        n, m = parse_mask_structure(self.mask_structure)
        step, total = event.global_step, event.total_steps
        start = int(self._resolve_step(self.start or 0, total))
        end_value = self.end if self.end not in (None, -1) else total
        end = int(self._resolve_step(end_value, total)) if end_value else start
        update = (step - start) % self.update_frequency == 0
        masks: dict[str, torch.Tensor] = getattr(self, "_masks", {})
        with torch.no_grad():
            for index, modules in self._targets.items():
                for name, module in modules.items():
                    if update or name not in masks:
                        target = self.sparsity_for(index, name)
                        sparsity = cubic_sparsity(step, start, end, self.init_sparsity, target)
                        masks[name] = self.prune_module(session, module, sparsity, n, m)
                        session.records[name].update(method=self.type_name(), sparsity=sparsity)
                    else:
                        weight_matrix(module).mul_(masks[name])
        self._masks = masks
