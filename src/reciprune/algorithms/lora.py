"""LoRA and DoRA: merging a trained low-rank adapter into the weight it adapts."""

from __future__ import annotations

import torch
from torch import Tensor


def lora_merge(
    W0: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    transposed: bool = False,
) -> Tensor:
    """The merged weight, in W0's dtype and layout (computed in fp32).

    LoRA (Hu et al., 'LoRA: Low-Rank Adaptation of Large Language Models', 2021): the adapted
    layer computes h = W0·x + s·B·A·x with A [r, in], B [out, r] and s = alpha / r, so the
    merged weight is W = W0 + s·B·A.
    DoRA (Liu et al., 'DoRA: Weight-Decomposed Low-Rank Adaptation', 2024): the direction
    W0 + s·B·A is renormalised to the trained magnitude m, W = m / ‖W0 + s·B·A‖ · (W0 + s·B·A),
    as PEFT merges it: the norm taken over each output row (PEFT's `get_weight_norm`, dim 1 of
    the [out, in] matrix), m of shape [out].
    `transposed`: W0 is stored [in, out] (GPT-2's Conv1D, PEFT's fan_in_fan_out).
    """
    W = W0.float().t() if transposed else W0.float()
    W = W + scaling * (B.float() @ A.float())
    if magnitude is not None:
        W = (magnitude.float() / torch.linalg.norm(W, dim=1)).unsqueeze(1) * W
    return (W.t() if transposed else W).to(W0.dtype)
