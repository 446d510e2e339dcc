"""Write a stage's output: a complete Hugging Face checkpoint plus recipe and manifest, atomically.

Everything is written into a hidden sibling folder and renamed into place at the end, so a run
that fails or is killed never leaves a half-written checkpoint where the next stage would look.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reciprune.errors import ReciPruneError

RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "reciprune_manifest.json"
#: Key in config.json under which the compressed-tensors sparsity metadata is stored.
SPARSITY_CONFIG_KEY = "sparsity_config"


def _json_default(value: Any) -> Any:
    # Manifests carry metrics and paths from many places; make the common non-JSON types readable.
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_json(data: Any) -> str:
    """Indented JSON text (with a final newline) for manifests and configs."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite`; called before any work starts."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ReciPruneError(
            f"output path {output_dir} exists and is a file, not a folder. Choose another "
            "--output-dir."
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ReciPruneError(
            f"output folder {output_dir} already exists and is not empty. Choose another "
            "--output-dir, or pass --overwrite to replace it."
        )


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | Path,
    *,
    recipe_yaml: str,
    manifest: dict,
    sparsity_config: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save model (safetensors), tokenizer, recipe.yaml and the manifest to `output_dir`.

    `sparsity_config` goes under config.json's "sparsity_config" key; `extra_files` (name →
    bytes, e.g. a loss-curve PNG) are written beside them. Returns the folder.

    A model with quantized modules (a `quantization_scheme` attached by QuantizationModifier)
    is saved through compressed-tensors: its weights are compressed in place (packed int4,
    int8, FP8; the model decompresses itself on its next forward), config.json gets their
    `quantization_config`, and the manifest the format and the bytes of the weight files.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    old: Path | None = None
    try:
        compressor = _quantization_compressor(model)
        if compressor is not None:
            from compressed_tensors.offload import as_single_threaded

            # Under torch.distributed compressed-tensors shares the work between processes,
            # but only the main process saves: compress here alone, or it waits for the others.
            with as_single_threaded():
                compressor.compress_model(model)
        model.save_pretrained(tmp)
        if compressor is not None:
            compressor.update_config(str(tmp))
            weight_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
            format_ = compressor.quantization_config.format
            manifest = {
                **manifest,
                "checkpoint": {"format": str(getattr(format_, "value", format_)),
                               "weight_bytes": weight_bytes},
            }
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if sparsity_config is not None:
            # Edit the written file rather than model.config: saving must not change the model.
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config[SPARSITY_CONFIG_KEY] = sparsity_config
            config_path.write_text(dump_json(config), encoding="utf-8")
        (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(dump_json(manifest), encoding="utf-8")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        if output_dir.is_dir() and any(output_dir.iterdir()):
            # Checked again here: the folder may have been filled while we were writing.
            check_output_dir(output_dir, overwrite)
            old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.old-"))
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)  # replaces a missing or empty folder in one step
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output_dir.exists():
            os.replace(old, output_dir)  # put the previous checkpoint back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return output_dir


def _quantization_compressor(model: PreTrainedModel) -> Any:
    """compressed-tensors' ModelCompressor for a model with quantized modules, else None (and
    compressed-tensors is not even imported: the plain save path stays as it was)."""
    if not any(hasattr(module, "quantization_scheme") for module in model.modules()):
        return None
    from compressed_tensors.compressors import ModelCompressor

    return ModelCompressor.from_pretrained_model(model)
