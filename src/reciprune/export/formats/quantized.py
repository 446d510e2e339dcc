"""compressed-tensors quantized weights (packed int4, int8, FP8) with quantization_config."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from reciprune.core.experts import ExpertSlice, is_fused_experts
from reciprune.core.targets import is_linear_like
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
        # Fused mixture-of-experts weights are written as they are in memory: transformers
        # loads a quantized checkpoint without converting per-expert names back.
        model.save_pretrained(folder, save_original_format=not _has_fused_experts(model))
        compressor.update_config(str(folder))
        _ignore_by_in_memory_name(model, folder)
        add_sparsity_metadata(folder, contents.sparsity)
        format_ = compressor.quantization_config.format
        return {"format": str(getattr(format_, "value", format_)), "weight_bytes": weight_bytes(folder)}


def _ignore_by_in_memory_name(model: PreTrainedModel, folder: Path) -> None:
    """Rewrite quantization_config.ignore with the names transformers matches it against.

    compressed-tensors writes checkpoint names (GPT-NeoX's head as `embed_out`) and leaves a
    tied head out (Falcon: `[]`), while the loader matches the in-memory names (`lm_head`):
    the dense head was then quantized on reload. The unquantized Linear-like modules are
    listed here, and the output head by role (`get_output_embeddings`), never by name.
    """
    from reciprune.export.save import dump_json

    head = model.get_output_embeddings()
    unquantized = {
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if (is_linear_like(module) or module is head)
        and not hasattr(module, "quantization_scheme")
        and not isinstance(module, ExpertSlice)  # a view into fused experts, not a module on reload
    }
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"]["ignore"] = sorted(unquantized)
    config_path.write_text(dump_json(config), encoding="utf-8")


def _has_fused_experts(model: PreTrainedModel) -> bool:
    return any(is_fused_experts(module) for module in model.modules())
