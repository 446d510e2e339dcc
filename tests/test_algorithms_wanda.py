"""Wanda against a brute-force per-row sort written with Python loops."""

from __future__ import annotations

import pytest
import torch

from reciprune.algorithms import mask_sparsity, satisfies_nm, wanda_prune, wanda_scores


def brute_force_wanda(W, x_sq_norm, sparsity):
    """For each row: score every weight, sort, zero the k smallest."""
    rows, columns = W.shape
    k = int(columns * sparsity)
    pruned = W.clone()
    keep = torch.ones(rows, columns, dtype=torch.bool)
    for r in range(rows):
        scores = [(abs(W[r, j].item()) * x_sq_norm[j].item() ** 0.5, j) for j in range(columns)]
        for _, j in sorted(scores)[:k]:
            pruned[r, j] = 0
            keep[r, j] = False
    return pruned, keep


def make_inputs(rows, columns, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    x_sq_norm = torch.rand(columns, generator=g) * 10
    return W, x_sq_norm


def test_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 0.0]])
    x_sq_norm = torch.tensor([4.0, 9.0, 0.25])
    expected = torch.tensor([[2.0, 6.0, 1.5], [8.0, 1.5, 0.0]])
    torch.testing.assert_close(wanda_scores(W, x_sq_norm), expected)


@pytest.mark.parametrize("rows,columns,sparsity", [(8, 32, 0.5), (16, 48, 0.3), (5, 20, 0.9)])
def test_matches_brute_force(rows, columns, sparsity):
    W, x_sq_norm = make_inputs(rows, columns, seed=rows * columns)
    pruned, keep = wanda_prune(W, x_sq_norm, sparsity)
    ref_pruned, ref_keep = brute_force_wanda(W, x_sq_norm, sparsity)
    assert torch.equal(keep, ref_keep)
    assert torch.equal(pruned, ref_pruned)


def test_every_row_prunes_exactly_its_share():
    W, x_sq_norm = make_inputs(12, 50, seed=1)
    _, keep = wanda_prune(W, x_sq_norm, 0.37)
    assert torch.all((~keep).sum(dim=1) == int(50 * 0.37))
    assert mask_sparsity(keep) == pytest.approx(int(50 * 0.37) / 50)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_highest_scores_in_every_group(n, m):
    W, x_sq_norm = make_inputs(8, 64, seed=m)
    pruned, keep = wanda_prune(W, x_sq_norm, 1 - n / m, n=n, m=m)
    assert satisfies_nm(pruned, n, m) and torch.all(keep.reshape(8, -1, m).sum(-1) == n)
    scores = wanda_scores(W, x_sq_norm).reshape(8, -1, m)
    kept_min = scores.masked_fill(~keep.reshape(8, -1, m), float("inf")).amin(-1)
    pruned_max = scores.masked_fill(keep.reshape(8, -1, m), float("-inf")).amax(-1)
    assert torch.all(kept_min >= pruned_max)


def test_keeps_dtype_and_exact_zeros():
    W, x_sq_norm = make_inputs(4, 16, seed=2)
    pruned, keep = wanda_prune(W.half(), x_sq_norm, 0.5)
    assert pruned.dtype == torch.float16
    assert torch.all(pruned[~keep] == 0) and torch.all(pruned[keep] == W.half()[keep])
