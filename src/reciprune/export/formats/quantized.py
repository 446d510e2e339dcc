"""compressed-tensors quantized weights (packed int4, int8, FP8) with quantization_config."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from reciprune.export.formats.base import CheckpointContents, CheckpointFormat, weight_bytes
from reciprune.export.formats.dense import add_sparsity_metadata


class QuantizedFormat(CheckpointFormat):
    """Modules with a `quantization_scheme` (QuantizationModifier) are compressed in place by
    compressed-tensors (the model decompresses itself on its next forward) and config.json gets
    their `quantization_config`. `packed`: the format compressed-tensors infers from each scheme
    (pack-quantized for int4, ...); otherwise its "dense" format (dequantized floats)."""

    name = "compressed-tensors"
    compressed = True

    def __init__(self, packed: bool = True) -> None:
        self.packed = packed

    def write(self, model: PreTrainedModel, folder: Path, contents: CheckpointContents) -> dict:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.offload import as_single_threaded

        compressor = ModelCompressor.from_pretrained_model(
            model, quantization_format=None if self.packed else "dense"
        )
        # Under torch.distributed compressed-tensors shares the work between processes, but
        # only the main process saves: compress here alone, or it waits for the others.
        with as_single_threaded():
            compressor.compress_model(model)
        model.save_pretrained(folder)
        compressor.update_config(str(folder))
        add_sparsity_metadata(folder, contents.sparsity)
        format_ = compressor.quantization_config.format
        return {"format": str(getattr(format_, "value", format_)), "weight_bytes": weight_bytes(folder)}
