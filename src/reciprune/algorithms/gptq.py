"""GPTQ one-shot weight quantization (Frantar et al., 2023), keeping the zeros of a sparse W."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, pairwise
from typing import Protocol

import torch
from torch import Tensor

from reciprune.algorithms.block_graph import BlockGraph
from reciprune.algorithms.hessian import dampened_inverse_cholesky, zero_dead_inputs


class ColumnQuantizer(Protocol):
    """The quantization grid GPTQ rounds onto, supplied by the caller.

    GPTQ decides *when* a grid is fixed and *what* is rounded; the quantizer says *how*: the
    scheme (bits, int/float, symmetric or not) and the observer (min-max, MSE) are its own, so
    compressed-tensors' `calculate_qparams` / `fake_quantize` plug in unchanged.
    """

    def find_params(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) of the weights `W` [rows, k] that share one grid per row.

        Called once per group with the group's k = group_size columns, returning [rows, 1]
        each; without groups, once with all columns, returning the layout the caller stores
        ([rows, 1] per channel, (1,) per tensor).
        """
        ...

    def quantize(self, w: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Q(w): the column `w` [rows, 1] rounded onto the grid of (scale, zero_point) and
        mapped back (quantize-dequantize), same shape and dtype."""
        ...


@dataclass
class GPTQParams:
    """What GPTQ fixed besides the weights: the grid of every group, in compressed-tensors' layout.

    `scale` and `zero_point` are [rows, in / group_size] with groups (group g = original input
    columns g·group_size … (g+1)·group_size − 1, in order), else as `find_params` returned them.
    `perm` is the order the input columns were visited in (arange without actorder). `loss` is
    Σ err² / 2 = Σ (w − q)² / (2 [Hinv]_ii²), which equals the damped layer error
    ½ tr(ΔW (H + λI) ΔWᵀ) with ΔW = Q − W ⊙ keep_mask (dead columns zeroed).
    """

    scale: Tensor
    zero_point: Tensor
    perm: Tensor
    loss: float


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    quantizer: ColumnQuantizer,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    group_size: int | None = None,
    keep_mask: Tensor | None = None,
    cuda_graph: bool | None = None,
) -> tuple[Tensor, GPTQParams]:
    """Quantize `W` [out, in] with GPTQ; return (quantized-dequantized W in W's dtype, params).

    Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
    Generative Pre-trained Transformers", ICLR 2023 (Algorithm 1; reference `fasterquant` in
    IST-DASLab/gptq).

    `H = 2/N Σ XᵀX` is the layer Hessian [in, in], used as given. With dead inputs (H_jj = 0)
    set to H_jj = 1 and W[:, j] = 0 (the input is always 0, so the column never matters), and
    dampening λ = percdamp · mean(diag H):

        Hinv = cholesky((H + λI)⁻¹, upper=True)          (rows of the OBS inverses)

    Columns i are visited left to right (with `actorder`, in order of decreasing H_ii). Each is
    rounded onto its grid and its error compensated on the columns not visited yet:

        q = Q(w) ⊙ m,   err = (w − q) / [Hinv]_ii,   W[:, i+1:] −= err ⊗ Hinv[i, i+1:]

    where w = W[:, i] is the current (already compensated) column and m = keep_mask[:, i]
    (all True without a mask). Columns are taken in blocks of `blocksize`: updates inside the
    block as above, to the columns after it lazily as W[:, i2:] −= Err @ Hinv[i1:i2, i2:].

    Grids: a group's (scale, zero_point) = quantizer.find_params(W[:, group] ⊙ keep_mask) from
    the current weights of all its columns, computed when the first of its columns is visited
    (none of them is quantized yet); without `group_size` one group spans all columns, so the
    grid comes from W itself. Groups are always the contiguous groups of the *original* input
    columns, also with `actorder`: this is compressed-tensors' `actorder: "weight"` (its
    g_idx-based "group" mode was removed), the saved format is the same as without actorder
    and needs no g_idx. The reference recomputes a group's grid from W at the group's first
    column (missing the updates of its own block) or, with `static_groups`, from the original
    W; here the pending updates are included.

    Sparsity: with `keep_mask` [out, in] (True = kept), W ⊙ keep_mask is quantized (non-zeros
    outside the mask are dropped uncompensated) and every pruned weight is exactly 0 in the
    result, so an N:M pattern survives. The rule q = Q(w) ⊙ m is GPTQ with the grid {0} for a
    pruned weight, i.e. SparseGPT's joint prune-and-quantize pass with the mask fixed: a
    pruned weight of a later column absorbs part of the compensation while unvisited, and is
    set back to 0 at its own column, its value propagated further as error. Masking the update
    instead (W[:, i+1:] −= (err ⊗ Hinv[i, i+1:]) ⊙ keep_mask[:, i+1:], llm-compressor's
    `preserve_zeros`) is not the OBS update of the constrained problem either (that would need
    the inverse of H over each row's kept inputs) and leaves a larger error, at times above
    round-to-nearest's.

    Computes in float32, or float64 when W is float64. `cuda_graph`: replay each block's
    column loop as one CUDA graph (None: when W is on CUDA); the same kernels, launched once
    per block instead of a dozen per column. Blocks where a group's grid is fixed after the
    block's first column (actorder) run eagerly.
    """
    [(Q, params)] = gptq_quantize_stacked(
        [W],
        H,
        quantizer,
        keep_masks=None if keep_mask is None else [keep_mask],
        blocksize=blocksize,
        percdamp=percdamp,
        actorder=actorder,
        group_size=group_size,
        cuda_graph=cuda_graph,
    )
    return Q, params


def gptq_quantize_stacked(
    Ws: Sequence[Tensor],
    H: Tensor,
    quantizer: ColumnQuantizer,
    *,
    keep_masks: Sequence[Tensor] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    group_size: int | None = None,
    cuda_graph: bool | None = None,
) -> list[tuple[Tensor, GPTQParams]]:
    """GPTQ on several matrices W_k [out_k, in] of one dtype that read the same input (one
    Hessian H), as one solve; returns (Q_k, params_k) for each, as `gptq_quantize` would.

    Given Hinv, GPTQ acts on the rows independently: the visiting order (actorder sorts by
    diag H), the groups (input columns) and Hinv are the same for every row; a row's grid is
    found from that row alone; q = Q(w) ⊙ m, err = (w − q) / [Hinv]_ii and
    W[r, i+1:] −= err_r · Hinv[i, i+1:] are row by row. So the rows of W = [W_1; …; W_K]
    (q/k/v, gate/up) are solved with one dampened inverse Cholesky and one pass over the
    columns. The quantizer must give one grid per row (channel or group strategy): a
    per-tensor grid couples all rows of a matrix and is refused with several matrices.

    The grids (`find_params`), the lazy update W[:, i2:] −= Err @ Hinv[i1:i2, i2:] and the
    loss are computed per matrix (segment of rows), the same operations on the same shapes as
    K separate solves, so the result equals them exactly; the column loop runs once.
    """
    if not Ws:
        raise ValueError("GPTQ: no matrix to quantize")
    columns = Ws[0].shape[1]
    if blocksize < 1:
        raise ValueError(f"GPTQ: blocksize must be at least 1, got {blocksize}")
    if any(W.shape[1] != columns or W.dtype != Ws[0].dtype for W in Ws):
        raise ValueError(
            "GPTQ: matrices solved together share one Hessian and need one input size and "
            f"dtype, got {[(tuple(W.shape), W.dtype) for W in Ws]}"
        )
    if group_size is not None and (group_size < 1 or columns % group_size):
        raise ValueError(
            f"GPTQ: group_size {group_size} does not divide the {columns} input columns; "
            "use a group size that divides the input dimension"
        )
    if keep_masks is not None:
        if len(keep_masks) != len(Ws):
            raise ValueError(f"GPTQ: {len(keep_masks)} keep masks for {len(Ws)} matrices")
        for mask, W in zip(keep_masks, Ws, strict=True):
            if mask.shape != W.shape:
                raise ValueError(
                    f"GPTQ: keep_mask has shape {tuple(mask.shape)}, the weight {tuple(W.shape)}"
                )

    dtype = Ws[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    W = torch.cat([W.detach().to(work) for W in Ws])
    H = H.detach().to(W.device, work, copy=True)
    if keep_masks is None:
        keep = torch.ones_like(W, dtype=torch.bool)
    else:
        keep = torch.cat([mask.to(W.device, torch.bool) for mask in keep_masks])
        W.masked_fill_(~keep, 0)
    segments = list(pairwise(accumulate((W.shape[0] for W in Ws), initial=0)))  # W_k's rows

    zero_dead_inputs(W, H)

    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
    else:
        perm = torch.arange(columns, device=W.device)
    invperm = torch.argsort(perm)

    Hinv = dampened_inverse_cholesky(H, percdamp, "GPTQ")

    group_size = group_size or columns
    group = (perm // group_size).tolist()  # group of the column at each visit position
    members = invperm.reshape(-1, group_size)  # visit positions of each group's columns
    fixed_at = set(members.amin(1).tolist())  # positions where a group's grid is fixed
    scales: list[Tensor] = [W.new_empty(0)] * members.shape[0]
    zeros: list[Tensor] = [W.new_empty(0)] * members.shape[0]
    prune = ~keep

    def fix_grid(W1: Tensor, Err1: Tensor | None, i1: int, i2: int, i: int) -> None:
        """The grid of the group whose first visited column is i1 + i, from current weights."""
        g = group[i1 + i]
        cols = members[g]
        inside = cols < i2
        found = []
        for r1, r2 in segments:
            # Current weights: W1 inside this block; after it, W still lacks this block's
            # updates so far (lazy batching), so add them.
            Wg = W[r1:r2][:, cols]
            if i:
                Wg = Wg - Err1[r1:r2, :i] @ Hinv[i1 : i1 + i, cols]
            Wg[:, inside] = W1[r1:r2][:, cols[inside] - i1]
            found.append(quantizer.find_params(Wg.masked_fill_(prune[r1:r2][:, cols], 0)))
            if len(segments) > 1 and found[-1][0].shape[0] != r2 - r1:
                raise ValueError(
                    "GPTQ: matrices solved together need a quantizer with one grid per row "
                    f"(channel or group strategy); find_params gave {tuple(found[-1][0].shape)}"
                )
        scales[g], zeros[g] = map(torch.cat, zip(*found, strict=True))

    def grids(positions: list[int]) -> tuple[Tensor, Tensor]:
        """The grid of the column at each visit position, stacked: [len, *grid shape]."""
        return torch.stack([scales[group[p]] for p in positions]), torch.stack(
            [zeros[group[p]] for p in positions]
        )

    block = BlockGraph(partial(_quantize_block, quantizer=quantizer), cuda_graph, W.device)
    Q = torch.zeros_like(W)
    losses = [torch.zeros((), dtype=work, device=W.device) for _ in segments]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        prune1 = prune[:, i1:i2]
        cuts = [i for i in range(count) if i1 + i in fixed_at]

        if cuts not in ([], [0]):
            # Grids fixed after the block's first column need its updates so far: run the
            # columns between them one range at a time.
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            starts = sorted({0, *cuts})
            for a, b in zip(starts, [*starts[1:], count], strict=True):
                if a in cuts:
                    fix_grid(W1, Err1, i1, i2, a)
                S1, Z1 = grids(list(range(i1 + a, i1 + b)))
                _quantize_columns(W1, Hinv1, prune1, S1, Z1, Q1, Err1, a, quantizer)
        else:
            if cuts:
                fix_grid(W1, None, i1, i2, 0)
            Q1, Err1 = block(W1, Hinv1, prune1, *grids(list(range(i1, i2))))

        Q[:, i1:i2] = Q1
        for s, (r1, r2) in enumerate(segments):
            losses[s] += Err1[r1:r2].square().sum() / 2
            W[r1:r2, i2:].addmm_(Err1[r1:r2], Hinv[i1:i2, i2:], alpha=-1)

    scale = torch.cat(scales, dim=-1)
    zero_point = torch.cat(zeros, dim=-1)
    Q = Q[:, invperm].to(dtype)
    return [
        (Q[r1:r2], GPTQParams(scale[r1:r2], zero_point[r1:r2], perm, loss.item()))
        for (r1, r2), loss in zip(segments, losses, strict=True)
    ]


def _quantize_block(
    W1: Tensor, Hinv1: Tensor, prune1: Tensor, S1: Tensor, Z1: Tensor, *, quantizer: ColumnQuantizer
) -> tuple[Tensor, Tensor]:
    """All columns of one block whose grids are known (S1, Z1 per column): returns (Q1, Err1)."""
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    _quantize_columns(W1, Hinv1, prune1, S1, Z1, Q1, Err1, 0, quantizer)
    return Q1, Err1


def _quantize_columns(
    W1: Tensor,
    Hinv1: Tensor,
    prune1: Tensor,
    S1: Tensor,
    Z1: Tensor,
    Q1: Tensor,
    Err1: Tensor,
    start: int,
    quantizer: ColumnQuantizer,
) -> None:
    """Columns start … start + len(S1) − 1 of a block, in place: q = Q(w) ⊙ m (grid S1, Z1 of
    each column), err = (w − q) / [Hinv]_ii, W1[:, i+1:] −= err ⊗ Hinv1[i, i+1:]."""
    rows = W1.shape[0]
    zero = W1.new_zeros(())
    for i in range(start, start + len(S1)):
        w = W1[:, i]
        q = quantizer.quantize(w.unsqueeze(1), S1[i - start], Z1[i - start]).reshape(rows)
        q = torch.where(prune1[:, i], zero, q.to(W1.dtype), out=Q1[:, i])
        err1 = torch.sub(w, q, out=Err1[:, i]).div_(Hinv1[i, i])
        W1[:, i + 1 :].addr_(err1, Hinv1[i, i + 1 :], alpha=-1)
