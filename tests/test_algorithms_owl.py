"""OWL against a loop over scores and a transcription of the reference's ratio formula."""

from __future__ import annotations

import pytest
import torch

from reciprune.algorithms.owl import outlier_ratio, owl_layer_nm, owl_layer_sparsities


def loop_outlier_ratio(scores, M):
    values = scores.flatten().tolist()
    mean = sum(values) / len(values)
    return sum(1 for v in values if v > M * mean) / len(values)


def reference_sparsities(ratios, target, lmbda):
    """The reference's arithmetic, step by step, with Python floats."""
    low, high = min(ratios), max(ratios)
    normed = [(r - low) * (1 / (high - low) * lmbda * 2) for r in ratios]
    mean = sum(normed) / len(normed)
    density = [d - mean + (1 - target) for d in normed]
    return [1 - d for d in density]


def reference_nm(ratios, prune_n, lmbda):
    """The reference's N:M arithmetic: per-layer pruned count of every M (prune convention)."""
    low, high = min(ratios), max(ratios)
    normed = [(r - low) * (1 / (high - low) * lmbda) for r in ratios]
    mean = sum(normed) / len(normed)
    return [prune_n - round(d - mean) for d in normed]


def layer_scores(seed, outliers):
    """Wanda-like positive scores of one layer with `outliers` planted large entries."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(40, 50, generator=g)
    scores.view(-1)[torch.randperm(2000, generator=g)[:outliers]] = 100.0
    return scores


@pytest.mark.parametrize("M", [1.0, 3.0, 5.0, 7.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlier_ratio_matches_loop(seed, M):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(30, 70, generator=g).exp()  # heavy right tail
    assert outlier_ratio(scores, M) == loop_outlier_ratio(scores, M)


def test_outlier_ratio_is_strict_and_counts_planted_outliers():
    assert outlier_ratio(torch.ones(10), 1.0) == 0.0  # equal to M × mean is not an outlier
    # 7 of 2000 entries at 100 lift the mean to ≈ 0.85; 5 × 0.85 is far below 100, above 1.
    assert outlier_ratio(layer_scores(0, outliers=7), 5.0) == 7 / 2000


@pytest.mark.parametrize("target,lmbda", [(0.5, 0.08), (0.7, 0.08), (0.3, 0.1), (0.9, 0.04)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsities_match_reference_and_keep_the_mean(seed, target, lmbda):
    g = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(32, generator=g) * 9).tolist()  # percentages, like the reference
    sparsities = owl_layer_sparsities(ratios, target, lmbda)
    assert sparsities == pytest.approx(reference_sparsities(ratios, target, lmbda), abs=1e-12)
    assert abs(sum(sparsities) / len(sparsities) - target) < 1e-6
    assert max(sparsities) - min(sparsities) == pytest.approx(2 * lmbda)


def test_scale_of_ratios_does_not_matter():
    ratios = [0.5, 2.0, 1.25, 3.0]
    percent = owl_layer_sparsities([100 * r for r in ratios], 0.6, 0.05)
    assert owl_layer_sparsities(ratios, 0.6, 0.05) == pytest.approx(percent, abs=1e-12)


def test_more_outliers_means_lower_sparsity():
    ratios = [
        outlier_ratio(layer_scores(i, outliers=count), 5.0)
        for i, count in enumerate([3, 40, 12, 0, 25])
    ]
    sparsities = owl_layer_sparsities(ratios, 0.7, 0.08)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)
    assert len(set(sparsities)) == 5


def test_equal_ratios_give_uniform_sparsity():
    assert owl_layer_sparsities([4.2] * 6, 0.55, 0.08) == [0.55] * 6
    assert owl_layer_sparsities([1.0], 0.5, 0.08) == [0.5]
    assert owl_layer_nm([4.2] * 6, 2, 4, 2.0) == [2] * 6


def test_sparsity_outside_range_raises_instead_of_clipping():
    with pytest.raises(ValueError, match="clipping would move the mean"):
        owl_layer_sparsities([0.0, 0.0, 0.0, 1.0], 0.1, 0.08)  # layer 3: 0.1 − 0.12 < 0
    with pytest.raises(ValueError, match="target sparsity"):
        owl_layer_sparsities([1.0, 2.0], 1.0, 0.08)
    with pytest.raises(ValueError, match="at least one layer"):
        owl_layer_sparsities([], 0.5, 0.08)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nm_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(32, generator=g) * 9).tolist()
    # The README's example: "5:8" (the reference prunes 5 of 8, i.e. keeps 3) with λ = 2.
    per_layer = owl_layer_nm(ratios, 3, 8, 2.0)
    assert per_layer == [8 - k for k in reference_nm(ratios, 5, 2.0)]
    order = sorted(range(32), key=lambda i: ratios[i])
    assert [per_layer[i] for i in order] == sorted(per_layer)  # more outliers, more kept


def test_nm_out_of_range_raises():
    with pytest.raises(ValueError, match="outside"):
        owl_layer_nm([0.0, 5.0, 10.0], 2, 4, 6.0)  # N would reach 2 − 3 and 2 + 3
    with pytest.raises(ValueError, match="0 < N < M"):
        owl_layer_nm([1.0, 2.0], 4, 4, 1.0)
