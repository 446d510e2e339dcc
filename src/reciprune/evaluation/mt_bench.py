"""MT-Bench-style answer generation: questions in, answers in the format FastChat's judge reads.

Questions are FastChat's `question.jsonl` lines, `{"question_id", "category", "turns": [str, …]}`.
Each question is answered turn by turn: the conversation so far (user turns and the model's own
previous answers) is rendered with the tokenizer's chat template when it has one (else as
"USER: …\\nASSISTANT: …" lines), and the next answer is generated greedily until eos or
`max_new_tokens`. The answers file has one line per question, as FastChat's
`gen_model_answer.py` writes it:
`{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [answer, …]}], "tstamp"}`,
so `gen_judgment.py` can score it (put it at `data/mt_bench/model_answer/<model_id>.jsonl`).
Decoding is greedy for every category (FastChat samples some categories at temperature 0.7);
greedy makes the answers reproducible.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reciprune.core.layers import eval_mode
from reciprune.errors import DataError
from reciprune.progress import progress_bar

DEFAULT_MAX_NEW_TOKENS = 512


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """The questions of a FastChat-format JSONL file, checked line by line."""
    file = Path(path)
    if not file.is_file():
        raise DataError(
            f"MT-Bench question file {file} does not exist. Pass a JSONL file with one "
            '{"question_id", "category", "turns": [...]} object per line (FastChat\'s '
            "question.jsonl format)."
        )
    questions = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number} is not valid JSON ({exc.msg}).") from exc
        turns = row.get("turns") if isinstance(row, dict) else None  # None: not an object
        if (
            not isinstance(turns, list)
            or not turns
            or "question_id" not in row
            or not all(isinstance(t, str) and t.strip() for t in turns)
        ):
            raise DataError(
                f"{file}:{number} is not an MT-Bench question: each line needs 'question_id' and "
                "'turns', a non-empty list of non-empty strings (and usually 'category')."
            )
        questions.append(row)
    if not questions:
        raise DataError(f"MT-Bench question file {file} holds no questions.")
    return questions


def render_conversation(messages: Sequence[dict[str, str]], tokenizer: Any) -> list[int]:
    """Token ids of a conversation ending with the prompt of the assistant's next turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        # The template holds its own special tokens (bos, turn markers).
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    lines = [f"{m['role'].upper()}: {m['content']}" for m in messages]
    return tokenizer("\n".join([*lines, "ASSISTANT:"]))["input_ids"]


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answer(
    model: Any, tokenizer: Any, messages: Sequence[dict[str, str]], max_new_tokens: int
) -> str:
    """The model's greedy reply to a conversation (text after the prompt, special tokens off)."""
    from transformers import GenerationConfig

    prompt = render_conversation(messages, tokenizer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop or None, pad_token_id=pad
    )
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
    )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip()


def answer_id(model_id: str, question_id: Any, turns: Sequence[str]) -> str:
    """A reproducible answer id (FastChat uses a random shortuuid; any unique string works)."""
    key = json.dumps([model_id, question_id, list(turns)], ensure_ascii=False)
    return uuid.uuid5(uuid.NAMESPACE_URL, key).hex[:22]


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    *,
    model_id: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One FastChat answer record per question, every turn answered in the same conversation."""
    records = []
    with eval_mode(model):
        for question in progress_bar(questions, desc="mt-bench", unit="question", progress=progress):
            messages: list[dict[str, str]] = []
            answers: list[str] = []
            for turn in question["turns"]:
                messages.append({"role": "user", "content": turn})
                reply = generate_answer(model, tokenizer, messages, max_new_tokens)
                messages.append({"role": "assistant", "content": reply})
                answers.append(reply)
            records.append({
                "question_id": question["question_id"],
                "answer_id": answer_id(model_id, question["question_id"], answers),
                "model_id": model_id,
                "choices": [{"index": 0, "turns": answers}],
                "tstamp": time.time(),
            })  # fmt: skip
    return records


def write_answers(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write answer records as JSONL through a temporary file renamed into place."""
    from reciprune.files import write_text_atomic

    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return write_text_atomic(path, lines)
