"""SparseGPTModifier: one-shot pruning with OBS weight reconstruction."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import nn

from reciprune.algorithms.sparsegpt import sparsegpt_prune
from reciprune.core.targets import set_weight_matrix, weight_matrix
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class SparseGPTModifier(PruningModifier):
    """Prune each Linear to a target sparsity and update the remaining weights to compensate (SparseGPT).

    Per decoder layer, the calibration inputs X of each Linear give H = 2/n Σ XᵀX (shared by
    modules that read the same input); the mask is chosen block by block on w²/[H⁻¹]²_jj and the
    kept weights are updated with the OBS formula. See `reciprune.algorithms.sparsegpt`.
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

    def prune_module(
        self, session: LifecycleSession, module: nn.Module, sparsity: float, n: int, m: int
    ) -> torch.Tensor:
        W, keep = sparsegpt_prune(
            weight_matrix(module),
            session.statistics.hessian(module),
            sparsity,
            n=n,
            m=m,
            blocksize=self.block_size,
            percdamp=self.dampening_frac,
        )
        set_weight_matrix(module, W)
        return keep
