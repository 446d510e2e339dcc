"""Strided sliding-window perplexity, as in the Hugging Face perplexity guide.

The texts are joined by eos into one token stream. Windows of `max_seq_length` tokens start every
`stride` tokens; in each window only the tokens not already scored by the previous window are
targets (the overlap is context only, labels -100). With `stride == max_seq_length` (the default)
the windows are disjoint, which is how SparseGPT/Wanda report WikiText perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reciprune.core.layer_io import (
    LayerStep,
    capture_layer_inputs,
    layer_output,
    layers_replaced,
    to_device,
)
from reciprune.core.layers import eval_mode, find_decoder_layers
from reciprune.data.calibration import _pad_rows, separator_ids, token_stream
from reciprune.data.training import IGNORE_INDEX
from reciprune.errors import DataError
from reciprune.progress import progress_bar

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
    stream: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_SLICE):
        if stream:
            stream.extend(separator_ids(tokenizer))
        stream.extend(token_stream(texts[start : start + _TOKENIZE_SLICE], tokenizer))
        if needed is not None and len(stream) >= needed:
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
    placement: Any = None,
) -> PerplexityResult:
    """Perplexity of `model` on `texts` over at most `max_samples` windows (None: all).

    With a `placement` (`reciprune.core.placement`) the model is run one decoder layer at a
    time on the placement's device, as the calibration pipelines run it, so a model larger than
    the device (or than memory, streamed) is measured without ever being there whole."""
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [
        _window_batch(tokens, spans[first : first + batch_size], pad_id)
        for first in range(0, len(spans), batch_size)
    ]
    with eval_mode(model):
        bar = progress_bar(total=len(spans), desc="perplexity", unit="window", progress=progress)
        if placement is None:
            logits = _whole_model_logits(model, batches)
        else:
            logits = layer_by_layer_logits(model, batches, placement)
        total_nll, total_tokens = 0.0, 0
        for batch, batch_logits in zip(batches, logits, strict=True):
            nll, count = _nll(batch_logits, batch["labels"])
            total_nll, total_tokens = total_nll + nll, total_tokens + count
            bar.update(len(batch["labels"]))
        bar.close()
    nll = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, num_tokens=total_tokens)


def _window_batch(tokens: torch.Tensor, spans: list[tuple[int, int, int]], pad_id: int) -> dict:
    input_ids, attention_mask = _pad_rows([tokens[b:e].tolist() for b, e, _ in spans], pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (begin, end, target_length) in enumerate(spans):
        # Only the tokens the previous window did not score are targets here.
        labels[row, end - begin - target_length : end - begin] = tokens[end - target_length : end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the label tokens; token t is predicted by the logits at t − 1."""
    shifted = logits[:, :-1].float().flatten(0, 1)
    targets = labels[:, 1:].flatten().to(logits.device)
    nll = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
    return nll, int((targets != IGNORE_INDEX).sum())


def _whole_model_logits(model: PreTrainedModel, batches: list[dict]) -> Iterator[torch.Tensor]:
    device = next(model.parameters()).device
    for batch in batches:
        yield model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).logits


def layer_by_layer_logits(model: nn.Module, batches: list[dict], placement: Any) -> Iterator[torch.Tensor]:
    """The model's logits on `batches`, computed one decoder layer at a time: the first layer's
    inputs are captured, every layer is fetched, run on all batches and released, and the
    modules after the layers (final norm, head) run on the last layer's outputs."""
    layers_name, layers = find_decoder_layers(model)
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with placement.outer_on_device(model):
        captured = capture_layer_inputs(model, layers[0], inputs, placement.device)
    tuple_outputs = False
    for index, layer in enumerate(layers):
        step = LayerStep(index, f"{layers_name}.{index}", layer)
        placement.fetch(step)
        for item in captured:
            kwargs = {k: to_device(v, placement.device) for k, v in item.kwargs.items()}
            output = layer(item.hidden.to(placement.device), **kwargs)
            tuple_outputs = isinstance(output, tuple | list)
            item.hidden = layer_output(output)
        placement.release(step, changed=False)
    with placement.outer_on_device(model):
        for batch, item in zip(inputs, captured, strict=True):
            with layers_replaced(model, len(layers), item.hidden, tuple_outputs):
                yield model(
                    input_ids=batch["input_ids"].to(placement.device),
                    attention_mask=batch["attention_mask"].to(placement.device),
                    use_cache=False,
                ).logits
