"""Dense weights already written layer by layer (the streaming pipeline); config and metadata."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from reciprune.export.formats.base import CheckpointContents, CheckpointFormat, weight_bytes
from reciprune.export.formats.dense import add_sparsity_metadata


class StreamedDenseFormat(CheckpointFormat):
    """The weights are in the folder already (`ShardWriter`, in the input's shard layout): only
    config.json (with the sparsity metadata) and generation_config.json are added, as
    save_pretrained would write them."""

    name = "dense-streamed"

    def write(self, model: PreTrainedModel, folder: Path, contents: CheckpointContents) -> dict:
        model.config.save_pretrained(folder)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
        add_sparsity_metadata(folder, contents.sparsity)
        return {"format": "dense", "weight_bytes": weight_bytes(folder), "streamed": True}
