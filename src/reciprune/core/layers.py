"""Finding a model's decoder layers from the model itself (no tracing); its eval mode for a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from reciprune.errors import ReciPruneError


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, and its name in the model.

    Uses `_no_split_modules` (the class names transformers itself keeps whole when sharding), and
    falls back to the longest ModuleList of identical blocks.
    """
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child).__name__ for child in module}
            if len(kinds) == 1:
                candidates.append((name, module))
    preferred = [c for c in candidates if type(c[1][0]).__name__ in block_classes]
    pool = preferred or candidates
    if not pool:
        raise ReciPruneError(
            f"could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            "identical blocks. reciprune supports decoder-only transformers models "
            "(Llama, Qwen2/3, Mistral, GPT-2, OPT and similar)."
        )
    return max(pool, key=lambda c: len(c[1]))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) inside the block, its own mode restored after, also when
    the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
