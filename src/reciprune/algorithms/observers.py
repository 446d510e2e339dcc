"""Weight quantization observers: the scale and zero point of a weight matrix.

Quantization follows compressed-tensors (the format vLLM and transformers load): for a group of
weights with range [x_min, x_max] (widened to contain 0) and integer grid [q_min, q_max],

    symmetric:   s = max(|x_min|, |x_max|) / ((q_max − q_min) / 2),   z = 0
    asymmetric:  s = (x_max − x_min) / (q_max − q_min),               z = round(q_min − x_min / s)
    Q(x) = s · (clamp(round(x / s + z), q_min, q_max) − z)

with `round` the cast to float8 (E4M3) for 8-bit float types. A scale is shared by the whole
tensor, by each output channel (row), or by each group of `group_size` consecutive inputs of a
row. `calculate_qparams` and `fake_quantize` of compressed-tensors compute s, z and Q here, so
the grid is exactly the one its packers and loaders use.

Since z is an integer on the grid, Q(0) = s · (z − z) = 0: quantization keeps every zero of a
pruned weight, symmetric or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs

#: Observers for weight scales: plain range, or the range shrunk to minimise the error.
OBSERVERS: tuple[str, ...] = ("minmax", "mse")
#: Weight strategies an observer handles: one scale per tensor, per row, per group of a row.
WEIGHT_STRATEGIES: tuple[str, ...] = ("tensor", "channel", "group")


def _strategy(args: QuantizationArgs) -> str:
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy not in WEIGHT_STRATEGIES:
        raise ValueError(
            f"weight strategy {strategy!r} is not supported; use one of {', '.join(WEIGHT_STRATEGIES)}"
        )
    return strategy


def per_scale_sum(x: Tensor, args: QuantizationArgs) -> Tensor:
    """Σ of `x` [out, in] over the weights that share each scale, shaped like the scales:
    (1,) per tensor, [out, 1] per channel, [out, in / group_size] per group."""
    strategy = _strategy(args)
    if strategy == "tensor":
        return x.sum().reshape(1)
    if strategy == "channel":
        return x.sum(dim=-1, keepdim=True)
    return x.unflatten(-1, (-1, args.group_size)).sum(dim=-1)


def weight_min_max(W: Tensor, args: QuantizationArgs) -> tuple[Tensor, Tensor]:
    """x_min and x_max of `W` [out, in] over the weights that share each scale (shapes as in
    `per_scale_sum`)."""
    strategy = _strategy(args)
    if strategy == "tensor":
        lo, hi = torch.aminmax(W)
        return lo.reshape(1), hi.reshape(1)
    if strategy == "channel":
        return W.amin(dim=-1, keepdim=True), W.amax(dim=-1, keepdim=True)
    if W.shape[-1] % args.group_size:
        raise ValueError(
            f"group_size {args.group_size} does not divide the {W.shape[-1]} input columns"
        )
    groups = W.unflatten(-1, (-1, args.group_size))
    return groups.amin(dim=-1), groups.amax(dim=-1)


def minmax_qparams(W: Tensor, args: QuantizationArgs) -> tuple[Tensor, Tensor]:
    """Scale and zero point from the full range of each group (the min-max observer)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    return calculate_qparams(*weight_min_max(W, args), args)


def mse_qparams(
    W: Tensor,
    args: QuantizationArgs,
    *,
    grid: int = 100,
    maxshrink: float = 0.2,
    norm: float = 2.4,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point from the shrunk range that minimises the quantization error.

    Frantar et al., "GPTQ", ICLR 2023 (reference `Quantizer.find_params(mse=True)`), and
    llm-compressor's MSE observer: for p = 1, 1 − 1/grid, …, 1 − (⌊maxshrink·grid⌋ − 1)/grid,
    quantize with the range [p·x_min, p·x_max] and keep, separately for each scale group g,

        p*_g = argmin_p Σ_{i ∈ g} |Q_p(W_i) − W_i|^norm

    (the first p on ties, so p = 1, plain min-max, unless shrinking strictly helps). Both
    references use norm 2.4, which weighs large errors a little more than squared error does.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x_min, x_max = weight_min_max(W, args)
    best_err = best_scale = best_zero = None
    for i in range(max(int(maxshrink * grid), 1)):
        p = 1 - i / grid
        scale, zero = calculate_qparams(p * x_min, p * x_max, args)
        err = per_scale_sum((fake_quantize(W, scale, zero, args) - W).abs().pow(norm), args)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def observe_weight(
    W: Tensor, args: QuantizationArgs, observer: str = "minmax"
) -> tuple[Tensor, Tensor]:
    """(scale, zero point) of `W` [out, in] for `args` with the named observer, in W's dtype
    (the zero point in `args.zp_dtype`), shaped as compressed-tensors stores them."""
    if observer == "minmax":
        return minmax_qparams(W, args)
    if observer == "mse":
        return mse_qparams(W, args)
    raise ValueError(f"unknown observer {observer!r}; use one of {', '.join(OBSERVERS)}")


def fake_quantize_weight(W: Tensor, scale: Tensor, zero_point: Tensor, args: QuantizationArgs) -> Tensor:
    """Q(W): `W` rounded onto the grid of (scale, zero point) and mapped back, in W's dtype."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    return fake_quantize(W, scale, zero_point, args).to(W.dtype)


def stored_qparams_on_grid(
    W: Tensor,
    stored: tuple[Tensor, Tensor | None] | None,
    scale: Tensor,
    zero: Tensor,
    args: QuantizationArgs,
) -> tuple[Tensor, Tensor] | None:
    """The stored (scale, zero point), shaped like the observer's, when W lies exactly on their
    grid (it is the previous stage's quantized output); else None."""
    if stored is None or stored[0].numel() != scale.numel():
        return None
    stored_scale = stored[0].to(scale.device, scale.dtype).reshape(scale.shape)
    if stored[1] is None:
        stored_zero = torch.zeros_like(zero)
    elif stored[1].numel() == zero.numel():
        stored_zero = stored[1].to(zero.device, zero.dtype).reshape(zero.shape)
    else:
        return None  # e.g. zero points packed 8 to an int32 by another tool
    if not torch.equal(fake_quantize_weight(W, stored_scale, stored_zero, args), W):
        return None
    return stored_scale, stored_zero


class ObserverColumnQuantizer:
    """GPTQ's column quantizer for one compressed-tensors QuantizationArgs and observer.

    A group's grid is found from its columns as one scale per row (the 'channel' form of the
    group arguments). Both methods work in the module's dtype, so Q(W) lies exactly on the grid
    of the scales stored beside it.
    """

    def __init__(self, args: QuantizationArgs, observer: str, dtype: torch.dtype) -> None:
        grouped = _strategy(args) == "group"
        self.args = args.model_copy(update={"strategy": "channel", "group_size": None}) if grouped else args
        self.observer = observer
        self.dtype = dtype

    def find_params(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero point) of W [rows, k] from the observer."""
        return observe_weight(W.to(self.dtype), self.args, self.observer)

    def quantize(self, w: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Q(w) of a column [rows, 1] on the grid of (scale, zero point)."""
        return fake_quantize_weight(w.to(self.dtype), scale, zero_point, self.args)
