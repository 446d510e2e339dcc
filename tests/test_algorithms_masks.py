"""Mask helpers, magnitude pruning and the cubic schedule."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from reciprune.algorithms import (
    cubic_sparsity,
    magnitude_prune,
    mask_sparsity,
    nm_keep_mask,
    parse_mask_structure,
    row_keep_mask,
    satisfies_nm,
    tensor_keep_mask,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("unstructured", (0, 0)),
        ("Unstructured", (0, 0)),
        ("2:4", (2, 4)),
        (" 4:8 ", (4, 8)),
        ("1:4", (1, 4)),
    ],
)
def test_parse_good(text, expected):
    assert parse_mask_structure(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("3:2", "smaller than M"),
        ("4:4", "smaller than M"),
        ("0:4", "at least 1"),
        ("-1:4", "at least 1"),
        ("2:x", "integers"),
        ("2.5:4", "integers"),
        ("2:4:8", "N:M"),
        ("dense", "N:M"),
        ("", "N:M"),
    ],
)
def test_parse_bad(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mask_structure(text)


def loop_nm_keep(scores, n, m):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            group = scores[r, start : start + m].tolist()
            for j in sorted(range(m), key=lambda j: group[j], reverse=True)[:n]:
                keep[r, start + j] = True
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_keep_mask_matches_loop(n, m):
    scores = torch.randn(6, 32, generator=torch.Generator().manual_seed(n * m))
    keep = nm_keep_mask(scores, n, m)
    assert torch.equal(keep, loop_nm_keep(scores, n, m))
    assert satisfies_nm(keep, n, m)
    assert mask_sparsity(keep) == pytest.approx(1 - n / m)


def test_nm_keep_mask_rejects_indivisible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_keep_mask(torch.randn(2, 10), 2, 4)


def test_satisfies_nm():
    W = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert satisfies_nm(W, 2, 4) and satisfies_nm(W, 1, 4) is False
    assert satisfies_nm(W != 0, 2, 4)
    assert satisfies_nm(torch.ones(2, 6), 2, 4) is False  # width not a multiple of m


def test_row_and_tensor_masks_prune_exact_counts():
    scores = torch.rand(10, 30, generator=torch.Generator().manual_seed(0))
    assert torch.all((~row_keep_mask(scores, 0.4)).sum(1) == 12)
    assert (~tensor_keep_mask(scores, 0.33)).sum() == int(300 * 0.33)
    assert row_keep_mask(scores, 0.0).all() and not tensor_keep_mask(scores, 1.0).any()


def test_magnitude_uses_one_global_threshold():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 40, generator=g) * torch.linspace(0.1, 3, 12).unsqueeze(1)
    pruned, keep = magnitude_prune(W, 0.6)
    k = int(W.numel() * 0.6)
    threshold = sorted(abs(v) for v in W.flatten().tolist())[k - 1]
    assert torch.equal(keep, W.abs() > threshold)
    assert torch.equal(pruned, torch.where(keep, W, torch.zeros_like(W)))
    # Rows with small weights lose more than their share: the threshold is not per row.
    assert (~keep[0]).sum() > (~keep[-1]).sum()


def test_magnitude_nm():
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    pruned, keep = magnitude_prune(W, 0.5, n=2, m=4)
    assert torch.equal(keep, loop_nm_keep(W.abs(), 2, 4))
    assert satisfies_nm(pruned, 2, 4)


def test_cubic_schedule_endpoints_and_monotone():
    args = dict(start=10, end=110, init_sparsity=0.05, final_sparsity=0.8)
    assert cubic_sparsity(0, **args) == 0.05
    assert cubic_sparsity(10, **args) == pytest.approx(0.05)
    assert cubic_sparsity(110, **args) == 0.8
    assert cubic_sparsity(500, **args) == 0.8
    # Halfway: s_f + (s_i - s_f) * 0.5**3
    assert cubic_sparsity(60, **args) == pytest.approx(0.8 - 0.75 * 0.125)
    values = [cubic_sparsity(t, **args) for t in range(0, 130)]
    assert all(b >= a for a, b in pairwise(values))
    # Cubic: most of the pruning happens early.
    assert cubic_sparsity(35, **args) - 0.05 > 0.5 * (0.8 - 0.05)


def test_cubic_schedule_rejects_end_before_start():
    with pytest.raises(ValueError, match="before start"):
        cubic_sparsity(5, start=10, end=5, init_sparsity=0.0, final_sparsity=0.5)
