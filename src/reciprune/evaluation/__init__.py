"""Evaluation: perplexity (and, elsewhere, lm-eval and generation tasks)."""

from reciprune.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
