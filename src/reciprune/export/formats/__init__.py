"""Checkpoint formats: one class per way of writing weights (see `base`).

`choose_format` resolves a `--save-format` name against what the modifiers produced:
- auto: compressed-tensors' packed formats (pack-quantized, float-quantized, ...) when modules
  are quantized, dense otherwise (streamed: already written layer by layer);
- dense: every weight as floats; quantized modules are stored dequantized with their
  quantization_config (compressed-tensors' "dense" format);
- sparse-bitmask, sparse-24-bitmask: refused when the options are read
  (`reciprune.recipe.options.SPARSE_FORMATS_UNAVAILABLE`), and here again for direct callers.
"""

from __future__ import annotations

from reciprune.errors import ReciPruneError
from reciprune.export.formats.base import CheckpointContents, CheckpointFormat
from reciprune.export.formats.dense import SPARSITY_CONFIG_KEY, DenseFormat, StreamedDenseFormat
from reciprune.export.formats.quantized import QuantizedFormat
from reciprune.recipe.options import SPARSE_FORMATS_UNAVAILABLE

__all__ = ["SPARSITY_CONFIG_KEY", "CheckpointContents", "CheckpointFormat", "choose_format"]


def choose_format(contents: CheckpointContents, name: str = "auto") -> CheckpointFormat:
    """The writer for `--save-format name` and `contents`, or a ReciPruneError saying why not."""
    if name.startswith("sparse-"):
        raise ReciPruneError(f"save format {name} is not available: {SPARSE_FORMATS_UNAVAILABLE}.")
    if name not in ("auto", "dense"):
        raise ReciPruneError(f"unknown save format {name!r}; choose auto or dense.")
    if contents.quantized:
        return QuantizedFormat(packed=name == "auto")
    return StreamedDenseFormat() if contents.streamed else DenseFormat()
