"""WandaModifier: prune by weight magnitude times input activation norm."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from reciprune.algorithms.wanda import wanda_prune
from reciprune.core.targets import set_weight_matrix, weight_matrix
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class WandaModifier(PruningModifier):
    """Prune the weights with the smallest |W_ij|·‖X_j‖₂ within each output row (Wanda); no weight update.

    ‖X_j‖₂ is the norm of input feature j over all calibration tokens of the layer's input.
    """

    paper: ClassVar[str] = (
        "Sun, Liu, Bair & Kolter, 'A Simple and Effective Pruning Approach for Large Language "
        "Models', ICLR 2024"
    )

    def prune_module(
        self, session: LifecycleSession, module: nn.Module, sparsity: float, n: int, m: int
    ) -> torch.Tensor:
        W, keep = wanda_prune(
            weight_matrix(module), session.statistics.sq_norm(module), sparsity, n=n, m=m
        )
        set_weight_matrix(module, W)
        return keep
