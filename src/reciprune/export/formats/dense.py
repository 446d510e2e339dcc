"""Dense weights (save_pretrained), with compressed-tensors sparsity metadata when pruned."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from reciprune.export.formats.base import CheckpointContents, CheckpointFormat, weight_bytes

#: Key in config.json under which the compressed-tensors sparsity metadata is stored.
SPARSITY_CONFIG_KEY = "sparsity_config"


def add_sparsity_metadata(folder: Path, sparsity: dict | None) -> None:
    """Write `sparsity` under config.json's "sparsity_config" (the file, not model.config:
    saving must not change the model)."""
    if sparsity is None:
        return
    from reciprune.export.save import dump_json

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config[SPARSITY_CONFIG_KEY] = sparsity
    config_path.write_text(dump_json(config), encoding="utf-8")


class DenseFormat(CheckpointFormat):
    """Every weight stored dense; zeros are advertised in the sparsity metadata only."""

    name = "dense"

    def write(self, model: PreTrainedModel, folder: Path, contents: CheckpointContents) -> dict:
        model.save_pretrained(folder)
        add_sparsity_metadata(folder, contents.sparsity)
        return {"format": self.name, "weight_bytes": weight_bytes(folder)}


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
