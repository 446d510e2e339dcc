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
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reciprune.errors import ReciPruneError
from reciprune.export.formats import SPARSITY_CONFIG_KEY, CheckpointContents, choose_format
from reciprune.export.verify import verify_reload
from reciprune.outputs import apply_umask, first_existing, sibling_folder, write_refused

RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "reciprune_manifest.json"
__all__ = ["MANIFEST_FILE", "RECIPE_FILE", "SPARSITY_CONFIG_KEY", "save_checkpoint"]


def _json_default(value: Any) -> Any:
    # Manifests carry metrics and paths from many places; make the common non-JSON types readable.
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_json(data: Any) -> str:
    """Indented JSON text (with a final newline) for manifests and configs."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _check_not_the_model(output_dir: Path, model: str | None) -> None:
    if model is None or not Path(model).expanduser().is_dir():
        return
    model_dir = Path(model).expanduser().resolve()
    target = output_dir.resolve()
    if target == model_dir or model_dir in target.parents:
        raise ReciPruneError(
            f"--output-dir {output_dir} is the model folder {model_dir} or inside it; saving there "
            "would replace or mix with the model being read. Choose an --output-dir outside the "
            "model folder."
        )


def _check_writable(output_dir: Path) -> None:
    # Checked on the nearest existing folder, so a bad path fails before any weights load and
    # leaves nothing behind (the probe file is removed at once).
    existing = first_existing(output_dir.parent)
    if not existing.is_dir():
        raise ReciPruneError(
            f"cannot create --output-dir {output_dir}: {existing} is a file, not a folder. Choose "
            "an --output-dir whose parent folders can be created."
        )
    refused = write_refused(existing)
    if refused is not None:
        raise ReciPruneError(
            f"cannot write --output-dir {output_dir}: no file can be created in {existing} "
            f"({refused.strerror or refused}: a read-only file system, permissions or a system "
            "folder). Choose a writable --output-dir."
        )


def check_output_dir(output_dir: Path, overwrite: bool, model: str | None = None) -> None:
    """Refuse a file, a non-empty folder unless `overwrite`, a folder that cannot be written, and
    the `model` folder or a folder inside it; called before any work starts."""
    output_dir = Path(output_dir).expanduser().absolute()
    _check_not_the_model(output_dir, model)
    _check_writable(output_dir)
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


def staging_folder(output_dir: Path) -> Path:
    """A new hidden sibling folder of `output_dir` that `save_checkpoint` renames into place."""
    return sibling_folder(output_dir, "tmp")


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | Path,
    *,
    recipe_yaml: str,
    manifest: dict,
    contents: CheckpointContents | None = None,
    save_format: str = "auto",
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
    staging: Path | None = None,
) -> Path:
    """Save model, tokenizer, recipe.yaml and the manifest to `output_dir`; returns the folder.

    `contents` (what the modifiers produced: sparsity metadata, quantized modules) decides the
    weight format with `save_format` (`reciprune.export.formats`); the manifest gets the
    format and the bytes of the weight files under `checkpoint`. A compressed format is reloaded
    and compared with `model` before anything is renamed into place (`verify_reload`).
    `extra_files` (name → bytes, e.g. a loss-curve PNG) are written beside them. `staging` is a folder from
    `staging_folder(output_dir)` that already holds what was written earlier (streamed weights).
    """
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_dir(output_dir, overwrite)
    contents = contents or CheckpointContents()
    writer = choose_format(contents, save_format)
    tmp = staging if staging is not None else staging_folder(output_dir)
    old: Path | None = None
    try:
        checkpoint = writer.write(model, tmp, contents)
        if writer.compressed:
            verify_reload(model, tmp, checkpoint["format"])
        manifest = {**manifest, "checkpoint": checkpoint}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(dump_json(manifest), encoding="utf-8")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        apply_umask(tmp)
        if output_dir.is_dir() and any(output_dir.iterdir()):
            # Checked again here: the folder may have been filled while we were writing.
            check_output_dir(output_dir, overwrite)
            old = sibling_folder(output_dir, "old")
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
