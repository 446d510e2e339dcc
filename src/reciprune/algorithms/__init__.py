"""Pure tensor algorithms for pruning: no hooks, no I/O, no logging."""

from reciprune.algorithms.distillation import (
    COMPARISONS,
    cosine_loss,
    kl_divergence_loss,
    mse_loss,
    square_head_loss,
)
from reciprune.algorithms.dsnot import dsnot_refine, merge_channel_moments
from reciprune.algorithms.lora import lora_merge
from reciprune.algorithms.magnitude import cubic_sparsity, magnitude_prune
from reciprune.algorithms.masks import (
    mask_sparsity,
    nm_keep_mask,
    parse_mask_structure,
    row_keep_mask,
    satisfies_nm,
    tensor_keep_mask,
)
from reciprune.algorithms.owl import outlier_ratio, owl_layer_nm, owl_layer_sparsities
from reciprune.algorithms.reconstruction import output_error
from reciprune.algorithms.sparsegpt import sparsegpt_prune, sparsegpt_prune_stacked
from reciprune.algorithms.wanda import wanda_prune, wanda_scores

__all__ = [
    "COMPARISONS",
    "cosine_loss",
    "cubic_sparsity",
    "dsnot_refine",
    "kl_divergence_loss",
    "lora_merge",
    "magnitude_prune",
    "mask_sparsity",
    "merge_channel_moments",
    "mse_loss",
    "nm_keep_mask",
    "outlier_ratio",
    "output_error",
    "owl_layer_nm",
    "owl_layer_sparsities",
    "parse_mask_structure",
    "row_keep_mask",
    "satisfies_nm",
    "sparsegpt_prune",
    "sparsegpt_prune_stacked",
    "square_head_loss",
    "tensor_keep_mask",
    "wanda_prune",
    "wanda_scores",
]
