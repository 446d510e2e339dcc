"""The per-layer report's reconstruction error: ‖WX − W'X‖²/‖WX‖² of each compressed module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reciprune.algorithms.reconstruction import output_error
from reciprune.core.events import Event
from reciprune.core.statistics import InputStatistics
from reciprune.core.targets import weight_matrix


class ReconstructionProbe:
    """Records the relative output error of every module a layer's modifiers changed.

    With the layer's input XᵀX (SparseGPT and GPTQ accumulate it anyway; `exact` asks for it
    for every module) the error is exact, ‖(W − W')X‖² = tr(ΔW XᵀX ΔWᵀ), with no extra
    forward pass. Otherwise it comes from the column norms the method collects (Wanda), the
    diagonal of XᵀX: Σ_ij ΔW_ij² ‖X_j‖² / Σ_ij W_ij² ‖X_j‖², which ignores the correlation
    between input channels; `reconstruction_error_kind` says which. The session calls
    `prepare` at LAYER_START, `snapshot` before the modifiers compress and `measure` after.
    """

    def __init__(self, exact: bool = False) -> None:
        self.exact = exact
        self._before: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, statistics: InputStatistics) -> None:
        if self.exact:
            statistics.require_hessians()

    def snapshot(self, modules: list[nn.Module]) -> None:
        self._before = {m: weight_matrix(m).detach().clone() for m in modules}

    def measure(
        self, event: Event, statistics: InputStatistics, records: dict[str, dict[str, Any]]
    ) -> None:
        names = {module: name for name, module in event.layer.named_modules()}
        for module, before in self._before.items():
            delta = before.float() - weight_matrix(module).float()
            if not bool(delta.any()):
                continue
            name = f"{event.layer_name}.{names[module]}" if event.layer_name else names[module]
            if statistics.has_hessian(module):
                xtx, kind = statistics.hessian(module), "exact"
                error, reference = output_error(delta, xtx), output_error(before, xtx)
            else:
                norms, kind = statistics.sq_norm(module), "diagonal"
                error = float((delta.square() * norms).sum())
                reference = float((before.float().square() * norms).sum())
            records[name]["reconstruction_error"] = error / max(reference, 1e-30)
            records[name]["reconstruction_error_kind"] = kind
        self._before = {}
