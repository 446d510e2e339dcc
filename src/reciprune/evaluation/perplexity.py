"""Strided sliding-window perplexity, as in the Hugging Face perplexity guide.

The texts are joined by eos into one token stream. Windows of `max_seq_length` tokens start every
`stride` tokens; in each window only the tokens not already scored by the previous window are
targets (the overlap is context only, labels -100). With `stride == max_seq_length` (the default)
the windows are disjoint, which is how SparseGPT/Wanda report WikiText perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reciprune.data.calibration import separator_ids, token_stream
from reciprune.errors import DataError

IGNORE_INDEX = -100
# Texts are tokenized in slices until the windows are covered, so a 16-window run does not
# tokenize thousands of passages it will never score.
_TOKENIZE_SLICE = 64


@dataclass
class PerplexityResult:
    """Perplexity `ppl = exp(nll)`, `nll` the mean negative log-likelihood per scored token."""

    ppl: float
    nll: float
    num_tokens: int


def window_spans(
    num_tokens: int, max_seq_length: int, stride: int, max_samples: int | None
) -> list[tuple[int, int, int]]:
    """(begin, end, target_length) of each window over a stream of `num_tokens` tokens."""
    spans = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_seq_length, num_tokens)
        spans.append((begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens or (max_samples is not None and len(spans) >= max_samples):
            break
    return spans


def _stream(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, needed: int | None
) -> list[int]:
    if needed is None:
        return token_stream(texts, tokenizer)
    stream: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_SLICE):
        if stream:
            stream.extend(separator_ids(tokenizer))
        stream.extend(token_stream(texts[start : start + _TOKENIZE_SLICE], tokenizer))
        if len(stream) >= needed:
            break
    return stream


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    max_seq_length: int = 512,
    stride: int | None = None,
    max_samples: int | None = 16,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on `texts` over at most `max_samples` windows (None: all)."""
    stride = max_seq_length if stride is None else stride
    if not 0 < stride <= max_seq_length:
        raise ValueError(f"stride must be in 1..max_seq_length ({max_seq_length}), got {stride}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    texts = [t for t in texts if t and t.strip()]
    needed = None if max_samples is None else max_seq_length + (max_samples - 1) * stride
    stream = _stream(texts, tokenizer, needed)
    if len(stream) < 2:
        raise DataError(
            f"the evaluation text has {len(stream)} tokens; perplexity needs at least 2. "
            "Pass a longer text."
        )
    tokens = torch.tensor(stream, dtype=torch.long)
    spans = window_spans(len(tokens), max_seq_length, stride, max_samples)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress)
        for first in range(0, len(spans), batch_size):
            batch = spans[first : first + batch_size]
            width = max(end - begin for begin, end, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (begin, end, target_length) in enumerate(batch):
                length = end - begin
                input_ids[row, :length] = tokens[begin:end]
                attention_mask[row, :length] = 1
                # Only the tokens the previous window did not score are targets here.
                labels[row, length - target_length : length] = tokens[end - target_length : end]
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                use_cache=False,
            ).logits
            # Token t is predicted by the logits at t-1; the first token of a window has no target.
            shifted = logits[:, :-1].float().flatten(0, 1)
            targets = labels[:, 1:].flatten().to(device)
            total_nll += F.cross_entropy(
                shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            total_tokens += int((targets != IGNORE_INDEX).sum())
            bar.update(len(batch))
        bar.close()
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, num_tokens=total_tokens)
