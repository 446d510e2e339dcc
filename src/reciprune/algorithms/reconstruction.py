"""Layer output error from the input second moment, without another forward pass."""

from __future__ import annotations

from torch import Tensor


def output_error(delta: Tensor, xtx: Tensor) -> float:
    """‖ΔW X‖²_F for inputs X with second moment `xtx` = XᵀX (any positive scale):

        ‖ΔW X‖² = tr(ΔW XᵀX ΔWᵀ) = Σ_i Δw_i XᵀX Δw_iᵀ

    `delta` is [out, in], `xtx` is [in, in]. Relative errors ‖WX − W'X‖² / ‖WX‖² are ratios of
    two calls, so the scale of `xtx` cancels.
    """
    delta = delta.float()
    return float(((delta @ xtx) * delta).sum())
