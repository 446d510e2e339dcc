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

    The error comes from the layer's input XᵀX, ‖(W − W')X‖² = tr(ΔW XᵀX ΔWᵀ), so no extra
    forward pass is needed. The session calls `prepare` at LAYER_START (the full XᵀX is then
    accumulated for every tracked module), `snapshot` before the modifiers compress, and
    `measure` after them.
    """

    def __init__(self) -> None:
        self._before: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, statistics: InputStatistics) -> None:
        statistics.require_hessians()

    def snapshot(self, modules: list[nn.Module]) -> None:
        self._before = {m: weight_matrix(m).detach().clone() for m in modules}

    def measure(
        self, event: Event, statistics: InputStatistics, records: dict[str, dict[str, Any]]
    ) -> None:
        if event.layer is None:
            self._before = {}
            return
        names = {module: name for name, module in event.layer.named_modules()}
        for module, before in self._before.items():
            delta = before.float() - weight_matrix(module).float()
            if not bool(delta.any()):
                continue
            xtx = statistics.hessian(module)
            error, reference = output_error(delta, xtx), output_error(before, xtx)
            name = f"{event.layer_name}.{names[module]}" if event.layer_name else names[module]
            records[name]["reconstruction_error"] = error / max(reference, 1e-30)
        self._before = {}
