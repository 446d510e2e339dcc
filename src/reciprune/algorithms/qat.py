"""Quantization-aware training: a Linear layer computed on fake-quantized weights (and inputs),
its gradients passed straight through the rounding.

Straight-through estimator (Bengio, Léonard & Courville, 'Estimating or Propagating Gradients
Through Stochastic Neurons', 2013), as used for quantization-aware training by Jacob et al.
('Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference', CVPR 2018) and for LLMs by LLM-QAT (Liu et al. 2023): the forward uses the quantized
values, the backward treats the quantizer as the identity,

    W_q = W + sg(Q(W) − W)        ⇒  ∂L/∂W = ∂L/∂W_q
    x_q = x + sg(Q(x) − x)        ⇒  ∂L/∂x = ∂L/∂x_q      (only for schemes that quantize inputs)
    y   = x_q W_qᵀ + b

with sg the stop-gradient. Q is the compressed-tensors quantizer of `observers`: weights on
fixed scales and zero points (one per tensor, row or group), inputs with dynamic scales computed
from each batch (per token, tensor or group) exactly as the saved model computes them when it
runs, so the trained forward and the exported checkpoint's forward are the same function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from reciprune.algorithms.observers import fake_quantize_weight

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """x + sg(q − x): the value of `q`, the gradient of `x`."""
    return x + (q - x).detach()


def fake_quantize_input(x: Tensor, args: QuantizationArgs) -> Tensor:
    """Q(x) of activations [..., in] with dynamic scales from `x` itself (per token, tensor or
    group of `args`), as compressed-tensors quantizes a module's inputs at inference."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    return fake_quantize(x, scale, zero_point, args)


def qat_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    zero_point: Tensor,
    weight_args: QuantizationArgs,
    input_args: QuantizationArgs | None = None,
) -> Tensor:
    """y = x_q W_qᵀ + b with straight-through gradients (equations in the module docstring);
    `weight` [out, in], `scale` / `zero_point` shaped as `observers.observe_weight` returns
    them. Q(W) is computed in fp32 and cast back, so a bf16 forward rounds on the same grid."""
    W_q = fake_quantize_weight(weight.detach().float(), scale, zero_point, weight_args)
    W_q = straight_through(weight, W_q.to(weight.dtype))
    if input_args is not None:
        x = straight_through(x, fake_quantize_input(x.detach(), input_args).to(x.dtype))
    return F.linear(x, W_q, bias)
