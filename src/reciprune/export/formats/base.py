"""The export-format interface: how a compressed model's weights and metadata go to disk."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedModel


@dataclass(frozen=True)
class CheckpointContents:
    """What the modifiers produced (their declared `produces`): the sparsity metadata of the
    pruned modules (None: no sparsity to advertise) and whether modules carry quantization
    schemes to pack."""

    sparsity: dict[str, Any] | None = None
    quantized: bool = False
    #: The weights were written into the output folder layer by layer already (streaming).
    streamed: bool = False


class CheckpointFormat(ABC):
    """Writes the model's weights and config.json into a (temporary) folder."""

    name: ClassVar[str]
    #: The stored weights are not the model's own tensors (packed, compressed): the folder is
    #: reloaded and compared with the model before it is renamed into place.
    compressed: ClassVar[bool] = False

    @abstractmethod
    def write(self, model: PreTrainedModel, folder: Path, contents: CheckpointContents) -> dict:
        """Save into `folder`; returns the manifest's `checkpoint` record."""


def weight_bytes(folder: Path) -> int:
    """Bytes of the safetensors weight files in `folder`."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
