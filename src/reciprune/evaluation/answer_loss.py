"""Log-likelihood of gold answers: the math metric that still moves on a small model.

A 135M model solves no ASDiv/GSM8K problem by generation, so exact match cannot tell two such
models apart; the negative log-likelihood of the reference answer given the question can. Each
problem is formatted exactly as question/answer fine-tuning formats it (prompt "Question: …
\\nAnswer:", response " {answer}" + eos), and only the response tokens are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reciprune.core.layers import eval_mode
from reciprune.data.training import IGNORE_INDEX, question_answer_data
from reciprune.progress import progress_bar


@dataclass
class AnswerLoss:
    """`nll_per_token`: mean NLL over all answer tokens; `nll_per_answer`: mean over problems of
    the summed NLL of each answer (−log p(answer | question)); `num_tokens`, `num_problems`."""

    nll_per_token: float
    nll_per_answer: float
    num_tokens: int
    num_problems: int


@torch.no_grad()
def answer_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_seq_length: int = 512,
    progress: bool = False,
) -> AnswerLoss:
    """Negative log-likelihood of each problem's `answer` given its `question` (see module)."""
    data = question_answer_data(problems, tokenizer, max_seq_length)
    device = next(model.parameters()).device
    per_problem: list[float] = []
    tokens = 0
    with eval_mode(model):
        starts = range(0, len(data), batch_size)
        for start in progress_bar(starts, desc="answer loss", unit="batch", progress=progress):
            batch = data.collate(range(start, min(start + batch_size, len(data))))
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits.float()
            targets = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )
            per_problem += nll.sum(dim=1).tolist()
            tokens += int((targets != IGNORE_INDEX).sum())
    total = sum(per_problem)
    return AnswerLoss(
        nll_per_token=total / max(tokens, 1),
        nll_per_answer=total / len(per_problem) if per_problem else math.nan,
        num_tokens=tokens,
        num_problems=len(per_problem),
    )
