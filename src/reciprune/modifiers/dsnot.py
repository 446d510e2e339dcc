"""DSnoTModifier: training-free prune-and-grow refinement of a sparse mask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from reciprune.algorithms.dsnot import dsnot_refine
from reciprune.algorithms.magnitude import magnitude_prune
from reciprune.algorithms.reconstruction import output_error
from reciprune.algorithms.sparsegpt import sparsegpt_prune
from reciprune.algorithms.wanda import wanda_prune
from reciprune.core.targets import set_weight_matrix, weight_matrix
from reciprune.errors import RecipeError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.pruning import PruningModifier
from reciprune.modifiers.registry import register_modifier

if TYPE_CHECKING:
    from reciprune.core.session import LifecycleSession


@register_modifier
class DSnoTModifier(PruningModifier):
    """Refine a sparse mask without training: swap pruned and kept weights to cancel each row's expected output error (DSnoT).

    Placed after a pruning modifier in the same stage (e.g. WandaModifier then DSnoTModifier) it
    refines the mask that modifier left; with `initial_method` it builds its own first. Per row
    the expected error e_i = Σ_{j pruned} W_ij μ_j (μ: the input channel means over the
    calibration tokens) is driven towards 0 by growing the pruned weight that best reduces it
    (scaled by 1/Var_j^pow_of_var_regrowing) and pruning the kept weight of opposite
    contribution with the lowest Wanda score. No weight is updated: a regrown weight gets its
    value from before pruning; kept weights keep the value the initial method gave them.

    As in the reference, modules whose name contains an entry of `skip_layers` ('mlp' by
    default) keep their initial mask. With `initial_method: sparsegpt` the initial mask and
    weights come from a real SparseGPT pass on the layer Hessian (the reference code path
    leaves that Hessian at zero). e_i is measured as the reference does, with μ summed over a
    calibration sequence (seqlen·μ), so `update_threshold` means what it means there.
    """

    initial_method: Literal["wanda", "sparsegpt", "magnitude"] | None = Field(
        None,
        description="How to build the initial mask; unset: refine the zeros left by the "
        "preceding pruning modifier of the stage.",
    )
    max_cycle_time: int = Field(50, ge=0, description="Most prune-and-grow cycles per row.")
    update_threshold: float = Field(
        0.1, ge=0.0, description="A row keeps swapping while its |expected error| exceeds this."
    )
    pow_of_var_regrowing: float = Field(
        1.0, ge=0.0, description="Exponent of the channel variance dividing the regrowing criterion."
    )
    pow_of_var_pruning: float = Field(
        0.0,
        ge=0.0,
        description="Exponent of the channel variance dividing the pruning (Wanda) score; the "
        "reference parses 1 but never applies it, so 0 reproduces it.",
    )
    without_same_sign: bool = Field(
        True,
        description="True (reference default): no check that a swap keeps the error's sign; "
        "False: reject swaps that flip it (always checked for N:M).",
    )
    skip_layers: list[str] = Field(
        default_factory=lambda: ["mlp"],
        description="Name fragments of modules to leave with their initial mask (the reference "
        "skips the MLP); [] refines every targeted module.",
    )
    keep_if_better: bool = Field(
        True,
        description="Keep a module's refined mask only when it lowers the true output error "
        "‖WX − W'X‖² on the calibration data (from the layer's XᵀX); otherwise keep the initial "
        "mask. Not in the paper: its mean-error objective can raise the true error (see the "
        "README); false reproduces the reference.",
    )
    block_size: int = Field(128, gt=0, description="SparseGPT block size for initial_method.")
    dampening_frac: float = Field(0.01, ge=0.0, description="SparseGPT dampening for initial_method.")

    example_before: ClassVar[dict[str, dict[str, Any]]] = {"WandaModifier": {"sparsity": 0.5}}
    paper: ClassVar[str] = (
        "Zhang et al., 'Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs', "
        "ICLR 2024"
    )

    def check_stage(self, earlier: list[Modifier]) -> str | None:
        if self.initial_method is None and not any(isinstance(m, PruningModifier) for m in earlier):
            return (
                "DSnoTModifier has no initial_method and no pruning modifier before it in its "
                "stage, so there is no mask to refine: set initial_method (wanda, sparsegpt, "
                "magnitude) or put e.g. a WandaModifier before it in the same stage"
            )
        return None

    def on_initialize(self, session: LifecycleSession) -> None:
        super().on_initialize(session)
        position = next(i for i, m in enumerate(session.modifiers) if m is self)
        problem = self.check_stage(session.modifiers[:position])
        if problem:
            raise RecipeError(problem)

    def track_layer(self, session: LifecycleSession, modules: dict[str, nn.Module]) -> None:
        # The dense weights, before a pruning modifier earlier in the stage compresses them at
        # LAYER_CALIBRATED: the initial mask and the regrown values come from them.
        self._dense = {m: weight_matrix(m).detach().clone() for m in modules.values()}
        for module in modules.values():
            session.statistics.track(
                module,
                hessian=self.keep_if_better or self.initial_method == "sparsegpt",
                moments=True,
            )

    def _initial(
        self, session: LifecycleSession, module: nn.Module, sparsity: float, n: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, keep mask) before refinement."""
        dense = self._dense[module]
        if self.initial_method is None:
            current = weight_matrix(module)
            return current.clone(), current != 0
        if self.initial_method == "wanda":
            return wanda_prune(dense, session.statistics.sq_norm(module), sparsity, n=n, m=m)
        if self.initial_method == "magnitude":
            return magnitude_prune(dense, sparsity, n=n, m=m)
        return sparsegpt_prune(
            dense,
            session.statistics.hessian(module),
            sparsity,
            n=n,
            m=m,
            blocksize=self.block_size,
            percdamp=self.dampening_frac,
        )

    def prune_module(
        self, session: LifecycleSession, module: nn.Module, sparsity: float, n: int, m: int
    ) -> torch.Tensor:
        W, keep = self._initial(session, module, sparsity, n, m)
        name = next(k for k, v in self.targeted_modules().items() if v is module)
        if not any(fragment in name for fragment in self.skip_layers):
            dense = self._dense[module]
            mean, var = session.statistics.channel_moments(module)
            # The reference sums x over a sequence's tokens (seqlen·μ); scaling μ the same way
            # keeps `update_threshold` in its units.
            seqlen = session.statistics.tokens_per_sequence(module)
            refined = dsnot_refine(
                dense,
                keep,
                mean * seqlen,
                var,
                session.statistics.sq_norm(module),
                n=n,
                m=m,
                max_cycle_time=self.max_cycle_time,
                update_threshold=self.update_threshold,
                pow_of_var_regrowing=self.pow_of_var_regrowing,
                pow_of_var_pruning=self.pow_of_var_pruning,
                without_same_sign=self.without_same_sign,
            )
            # Regrown weights come back with their dense value; kept ones keep theirs.
            refined_W = torch.where(W != 0, W, dense) * refined
            if self.keep_if_better:
                xtx = session.statistics.hessian(module)
                if output_error(dense - refined_W, xtx) >= output_error(dense - W * keep, xtx):
                    refined, refined_W = keep, W * keep
            session.records[name]["dsnot_swaps"] = int((refined != keep).sum()) // 2
            keep, W = refined, refined_W
        set_weight_matrix(module, W * keep)
        return keep
