"""SparseGPTModifier: one-shot pruning with OBS weight reconstruction."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import nn

from reciprune.algorithms.sparsegpt import sparsegpt_prune_stacked
from reciprune.core.targets import set_weight_matrix, weight_matrix
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class SparseGPTModifier(PruningModifier):
    """Prune each Linear to a target sparsity and update the remaining weights to compensate (SparseGPT).

    Per decoder layer, the calibration inputs X of each Linear give H = 2/n Σ XᵀX (shared by
    modules that read the same input, which are then solved together); the mask is chosen block
    by block on w²/[H⁻¹]²_jj and the kept weights are updated with the OBS formula. See
    `reciprune.algorithms.sparsegpt`.
    """

    block_size: int = Field(128, gt=0, description="Columns pruned and updated together (lazy batch).")
    dampening_frac: float = Field(
        0.01, ge=0.0, description="Fraction of the mean Hessian diagonal added to its diagonal."
    )

    needs_hessian: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Frantar & Alistarh, 'SparseGPT: Massive Language Models Can Be Accurately Pruned in "
        "One-Shot', ICML 2023"
    )
    legacy_fields: ClassVar[dict[str, str | None]] = {
        **PruningModifier.legacy_fields,
        "percdamp": "dampening_frac",
        "blocksize": "block_size",
    }

    def prune_layer(
        self, session: LifecycleSession, layer_index: int, modules: dict[str, nn.Module]
    ) -> dict[str, torch.Tensor]:
        # Modules that read one input (q/k/v, gate/up) share H and are solved together, each at
        # its own sparsity: the same weights as one solve per module, one Hinv and column pass.
        n, m = self.structure_for(layer_index)
        name_of = {module: name for name, module in modules.items()}
        masks: dict[str, torch.Tensor] = {}
        for shared in session.statistics.shared_groups(modules.values()):
            solved = sparsegpt_prune_stacked(
                [weight_matrix(module) for module in shared],
                session.statistics.hessian(shared[0]),
                [self.sparsity_for(layer_index, name_of[module]) for module in shared],
                n=n,
                m=m,
                blocksize=self.block_size,
                percdamp=self.dampening_frac,
            )
            for module, (W, keep) in zip(shared, solved, strict=True):
                set_weight_matrix(module, W)
                masks[name_of[module]] = keep
        return {name: masks[name] for name in modules}
