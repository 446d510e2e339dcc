"""Sliding-window perplexity equals a token-by-token naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from reciprune.data import embedded_heldout_texts, token_stream
from reciprune.errors import DataError
from reciprune.evaluation import perplexity
from reciprune.evaluation.perplexity import window_spans


def naive_nll(model, stream: list[int], max_length: int, stride: int, max_windows: int | None):
    """The HF guide's loop, scoring every target token with its own forward pass and log-softmax."""
    total, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + max_length, len(stream))
        for t in range(max(begin + 1, prev_end), end):
            context = torch.tensor([stream[begin:t]])
            with torch.no_grad():
                logits = model(input_ids=context).logits[0, -1].double()
            total -= torch.log_softmax(logits, dim=-1)[stream[t]].item()
            count += 1
        prev_end, windows = end, windows + 1
        if end == len(stream) or (max_windows is not None and windows >= max_windows):
            break
    return total / count, count


@pytest.fixture
def texts() -> list[str]:
    return [t[:120] for t in embedded_heldout_texts()[:3]]


@pytest.mark.parametrize(
    ("max_seq_length", "stride", "batch_size", "max_samples"),
    [(16, None, 3, None), (16, 8, 2, None), (16, 5, 4, 4), (32, None, 1, 2)],
)
def test_matches_naive_reference(
    tiny_llama, tiny_tokenizer, texts, max_seq_length, stride, batch_size, max_samples
) -> None:
    model = tiny_llama()
    result = perplexity(
        model,
        tiny_tokenizer,
        texts,
        max_seq_length=max_seq_length,
        stride=stride,
        max_samples=max_samples,
        batch_size=batch_size,
        progress=False,
    )
    stream = token_stream(texts, tiny_tokenizer)
    nll, count = naive_nll(model, stream, max_seq_length, stride or max_seq_length, max_samples)
    assert result.num_tokens == count
    assert result.nll == pytest.approx(nll, abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_every_token_after_the_first_is_scored_once() -> None:
    for stride in (1, 3, 8):
        spans = window_spans(50, 8, stride, None)
        assert sum(target for _, _, target in spans) == 50
        assert spans[-1][1] == 50
    assert len(window_spans(50, 8, 8, 3)) == 3


def test_disjoint_windows_count(tiny_llama, tiny_tokenizer) -> None:
    result = perplexity(
        tiny_llama(),
        tiny_tokenizer,
        embedded_heldout_texts()[:50],
        max_seq_length=32,
        max_samples=5,
        progress=False,
    )
    assert result.num_tokens == 5 * 31  # the first token of each disjoint window has no target


def test_restores_training_mode_and_rejects_bad_input(tiny_llama, tiny_tokenizer) -> None:
    model = tiny_llama().train()
    perplexity(model, tiny_tokenizer, ["some text to score here"], max_seq_length=8, progress=False)
    assert model.training
    with pytest.raises(DataError, match="at least 2"):
        perplexity(model, tiny_tokenizer, ["", "  "], progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tiny_tokenizer, ["text"], max_seq_length=8, stride=9, progress=False)
