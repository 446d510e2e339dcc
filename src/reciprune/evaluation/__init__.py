"""Evaluation: perplexity, gold-answer likelihood, lm-eval and local tasks, MT-Bench, compare."""

from reciprune.evaluation.answer_loss import AnswerLoss, answer_loss
from reciprune.evaluation.harness import evaluate_model
from reciprune.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["AnswerLoss", "PerplexityResult", "answer_loss", "evaluate_model", "perplexity"]
