"""Checkpoint formats: one class per way of writing weights (see `base`).

`choose_format` picks by name, or ("auto") the first in `FORMATS` whose `applies` accepts what
the modifiers produced: compressed-tensors when modules are quantized, else dense.
"""

from __future__ import annotations

from reciprune.errors import ReciPruneError
from reciprune.export.formats.base import CheckpointContents, CheckpointFormat
from reciprune.export.formats.dense import SPARSITY_CONFIG_KEY, DenseFormat
from reciprune.export.formats.quantized import QuantizedFormat
from reciprune.export.formats.streamed import StreamedDenseFormat

FORMATS: dict[str, type[CheckpointFormat]] = {
    cls.name: cls for cls in (QuantizedFormat, StreamedDenseFormat, DenseFormat)
}
__all__ = ["FORMATS", "SPARSITY_CONFIG_KEY", "CheckpointContents", "CheckpointFormat", "choose_format"]


def choose_format(contents: CheckpointContents, name: str = "auto") -> CheckpointFormat:
    """The format called `name`, or the first that applies to `contents` ("auto")."""
    if name == "auto":
        return next(cls for cls in FORMATS.values() if cls.applies(contents))()
    if name not in FORMATS:
        raise ReciPruneError(
            f"unknown save format {name!r}; choose one of: auto, {', '.join(FORMATS)}."
        )
    if not FORMATS[name].applies(contents):
        raise ReciPruneError(
            f"save format {name!r} cannot store this model "
            f"({'quantized' if contents.quantized else 'not quantized'}); use auto."
        )
    return FORMATS[name]()

