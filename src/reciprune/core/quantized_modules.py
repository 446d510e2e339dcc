"""Quantization state on the modules themselves: compressed-tensors' parameters and status,
the fake-quantized forward of quantization-aware training, and the scales and zero points a
compressed-tensors checkpoint stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from reciprune.algorithms.qat import qat_linear
from reciprune.core.targets import set_weight_matrix

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme


@torch.no_grad()
def attach_quantization(
    module: nn.Module, scheme: QuantizationScheme, Q: torch.Tensor, scale: torch.Tensor,
    zero: torch.Tensor,
) -> None:
    """Give `module` compressed-tensors' quantization layout for `scheme` (parameters
    weight_scale / weight_zero_point / input_scale, and the forward that fake-quantizes the
    inputs and re-rounds W, a no-op once on the grid), set its scale and zero point, and replace
    its weight by Q (already on that grid). The status is left at initialized: the caller sets
    static input scales, then FROZEN."""
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    initialize_module_for_quantization(module, scheme)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    set_weight_matrix(module, Q)


@torch.no_grad()
def set_static_input_qparams(
    module: nn.Module, lo: torch.Tensor, hi: torch.Tensor, args: QuantizationArgs
) -> None:
    """Set the static input scale (and zero point) that `attach_quantization` gave `module`
    from the min `lo` and max `hi` of its calibration inputs."""
    from compressed_tensors.quantization.utils import calculate_qparams

    dtype = module.input_scale.dtype
    in_scale, in_zero = calculate_qparams(
        lo.to(dtype).reshape(1), hi.to(dtype).reshape(1), args
    )
    module.input_scale.data.copy_(in_scale.reshape(module.input_scale.shape))
    if hasattr(module, "input_zero_point"):
        module.input_zero_point.data.copy_(in_zero.reshape(module.input_zero_point.shape))


class FakeQuantizedForward:
    """A Linear's forward during quantization-aware training: `qat_linear` on its own weight
    (the full tensor under FSDP2, which gathers the layer's parameters before its forward), so
    parameter names and state dicts stay those of the plain model."""

    def __init__(
        self, module: nn.Module, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantizationScheme
    ) -> None:
        self.module, self.scale, self.zero = module, scale, zero
        self.weights, self.inputs = scheme.weights, scheme.input_activations

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        module = self.module
        return qat_linear(
            input, module.weight, module.bias, self.scale, self.zero, self.weights, self.inputs
        )


def checkpoint_qparams(
    model: nn.Module, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Module name → (weight_scale, weight_zero_point or None) stored in the compressed-tensors
    checkpoint `model` was loaded from (its `name_or_path` folder); {} for any other model.

    A finetune stage loads the previous stage's checkpoint dequantized (plain float weights, see
    `reciprune.models.load_model`), which drops these: read back, they let quantization-aware
    training continue on the very grid a oneshot GPTQ stage chose, where re-observing the
    rounded weights would give other scales and round every weight again.
    """
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    config = folder / "config.json"
    if not names or not config.is_file():
        return {}
    quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        return {}
    from safetensors import safe_open

    wanted = {f"{n}.{part}" for n in names for part in ("weight_scale", "weight_zero_point")}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in wanted.intersection(handle.keys()):
                tensors[key] = handle.get_tensor(key)
    return {
        n: (tensors[f"{n}.weight_scale"], tensors.get(f"{n}.weight_zero_point"))
        for n in names
        if f"{n}.weight_scale" in tensors
    }
