"""compressed-tensors quantized weights (packed int4, int8, FP8) with quantization_config."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from torch import nn
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

        unpackable = _modules_the_loader_cannot_init_packed(model) if self.packed else []
        if unpackable:
            warnings.warn(
                f"{type(model).__name__}: transformers initialises `.weight` of {unpackable[0]} "
                "while loading, which a packed quantized module no longer has, so a packed "
                "checkpoint would not load; saved in compressed-tensors' dense format instead "
                "(the same quantized values, stored as floats).",
                stacklevel=2,
            )
        packed = self.packed and not unpackable
        with _quiet_format_override():
            compressor = ModelCompressor.from_pretrained_model(
                model, quantization_format=None if packed else "dense"
            )
        # Under torch.distributed compressed-tensors shares the work between processes, but
        # only the main process saves: compress here alone, or it waits for the others.
        with as_single_threaded():
            compressor.compress_model(model)
        # Fused mixture-of-experts weights are written as they are in memory: transformers
        # loads a quantized checkpoint without converting per-expert names back.
        fused = any(is_fused_experts(module) for module in model.modules())
        model.save_pretrained(folder, save_original_format=not fused)
        compressor.update_config(str(folder))
        _ignore_by_in_memory_name(model, folder)
        add_sparsity_metadata(folder, contents.sparsity)
        format_ = compressor.quantization_config.format
        record = {"format": str(getattr(format_, "value", format_)), "weight_bytes": weight_bytes(folder)}
        return {**record, "packing_unsupported_by": unpackable[0]} if unpackable else record


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


@contextlib.contextmanager
def _quiet_format_override() -> Iterator[None]:
    """compressed-tensors warns once per quantized module that the asked-for "dense" format is
    not the one it would infer: thousands of lines for a 70B model, about what we asked for."""
    from loguru import logger

    logger.disable("compressed_tensors.compressors.format")
    try:
        yield
    finally:
        logger.enable("compressed_tensors.compressors.format")


def _modules_the_loader_cannot_init_packed(model: PreTrainedModel) -> list[str]:
    """Classes of quantized modules whose `_init_weights` fails without a `.weight` parameter.

    A packed module stores `weight_packed` instead of `weight`; transformers runs the model's
    `_init_weights` on it while loading, and some architectures read `.weight` unguarded
    (transformers 5.25's Falcon: AttributeError). Probed on an empty module of each class.
    """
    failing: list[str] = []
    for cls in {type(m) for m in model.modules() if hasattr(m, "quantization_scheme")}:
        probe = cls.__new__(cls)
        nn.Module.__init__(probe)
        probe.register_parameter("bias", None)
        try:
            model._init_weights(probe)
        except AttributeError:
            failing.append(cls.__name__)
        except Exception:  # noqa: BLE001, S112 - any other complaint is about the empty probe itself
            continue
    return sorted(failing)
