"""What a run produced and how: the manifest, per-layer sparsity, compressed-tensors metadata."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import reciprune
from reciprune.algorithms.masks import satisfies_nm
from reciprune.core.experts import ExpertSlice, attach_expert_slices
from reciprune.core.targets import is_linear_like, weight_matrix
from reciprune.models import ModelSource

MANIFEST_VERSION = 1

#: N:M patterns reported per layer, strongest first: "2:4" = at least 2 zeros in every 4.
NM_PATTERNS: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))

_PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "compressed-tensors",
    "pydantic",
    "safetensors",
    "accelerate",
    "peft",
    "bitsandbytes",
    "numpy",
)


def sha256_text(s: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of reciprune, its main dependencies and Python ("not installed" when absent)."""
    versions = {"reciprune": reciprune.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    # torch's own string names the build (2.10.0+cu128, 2.13.0+cpu); the wheel metadata may not.
    versions["torch"] = torch.__version__
    versions["python"] = platform.python_version()
    return versions


def git_revision() -> str | None:
    """Commit of the reciprune source tree when it is a git checkout; None otherwise, never raises."""
    package_dir = Path(reciprune.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package_dir), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None

    toplevel = git("rev-parse", "--show-toplevel")
    # An installed copy inside some other repository (a venv in a project) is not our checkout.
    if toplevel is None or not (Path(toplevel) / "src" / "reciprune").is_dir():
        return None
    return git("rev-parse", "HEAD")


def build_manifest(
    *,
    recipe_yaml: str,
    model_source: ModelSource,
    data_fingerprint: str | dict[str, str | None] | None,
    seed: int | None,
    metrics: dict,
    timings: dict,
    layers: dict,
    extra: dict | None = None,
) -> dict:
    """The `reciprune_manifest.json` content: inputs (by hash), environment, results.

    The recipe's text is stored too (`recipe`, the explicit form that was applied), so the
    manifest alone is enough for `reciprune run --from-manifest`. Keys of `extra` are added at
    the top level; they may not replace a standard key.
    """
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_sha256": sha256_text(recipe_yaml),
        "recipe": recipe_yaml,
        "model": asdict(model_source),
        "data_fingerprint": data_fingerprint,
        "seed": seed,
        "metrics": metrics,
        "timings": timings,
        "layers": layers,
        "versions": package_versions(),
        "git_revision": git_revision(),
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"manifest key {key!r} is reserved; put it under another name")
        manifest[key] = value
    return manifest


def _default_modules(model: nn.Module) -> dict[str, nn.Module]:
    # The output head (lm_head, tied or not) is never pruned by default; embeddings are not Linear.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if is_linear_like(module) and module is not head
    }


def _selected_modules(model: nn.Module, module_names: Iterable[str] | None) -> dict[str, nn.Module]:
    if module_names is None:
        return _default_modules(model)
    attach_expert_slices(model)  # a model rebuilt for saving names its experts again
    modules = dict(model.named_modules())
    selected = {}
    for name in module_names:
        if name not in modules:
            raise KeyError(f"model has no module named {name!r}")
        selected[name] = modules[name]
    return selected


#: Reads a module's [out, in] weight: from the module itself, or (streamed models, whose layers
#: are not in memory) from the files written.
WeightSource = Callable[[str, nn.Module], torch.Tensor]


def _own_weight(name: str, module: nn.Module) -> torch.Tensor:
    return weight_matrix(module)


def layer_sparsity_report(
    model: nn.Module,
    module_names: Iterable[str] | None = None,
    weights: WeightSource = _own_weight,
) -> dict[str, dict]:
    """Per Linear-like module: exact-zero fraction, shape, numel and the N:M pattern that holds.

    `module_names=None` reports every Linear-like module except the output head.
    """
    report: dict[str, dict] = {}
    for name, module in _selected_modules(model, module_names).items():
        matrix = weights(name, module).detach()
        zeros = int((matrix == 0).sum())
        # At least n zeros in every m is at most m - n non-zeros.
        nm = next((f"{n}:{m}" for n, m in NM_PATTERNS if satisfies_nm(matrix, m - n, m)), None)
        report[name] = {
            "sparsity": zeros / matrix.numel(),
            "shape": list(matrix.shape),
            "numel": matrix.numel(),
            "zeros": zeros,
            "nm": nm,
        }
    return report


def sparsity_config(
    model: nn.Module,
    module_names: Iterable[str],
    *,
    structure: str,
    ignore: list[str],
    targets: list[str] | None = None,
    weights: WeightSource = _own_weight,
) -> dict:
    """compressed-tensors sparsity metadata (format "dense") for the pruned `module_names`.

    Built with compressed_tensors' own `SparsityCompressionConfig` so the field names are the
    ones its loaders expect; `global_sparsity` is the zero fraction over `module_names`.
    `targets` defaults to those module names; pass the recipe's patterns (e.g. ["Linear"]) to
    record them instead.
    """
    from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig

    selected = _selected_modules(model, module_names)
    zeros = numel = 0
    for name, module in selected.items():  # one weight at a time: streamed weights are on disk
        matrix = weights(name, module)
        zeros, numel = zeros + int((matrix == 0).sum()), numel + matrix.numel()
    config = SparsityCompressionConfig.load_from_registry(
        CompressionFormat.dense.value,
        targets=list(selected) if targets is None else list(targets),
        ignore=list(ignore),
        global_sparsity=zeros / numel if numel else 0.0,
        sparsity_structure=structure,
    )
    return config.model_dump(mode="json")


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (found by role, `get_output_embeddings`, not by name)."""
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is head}


def describe_sparsity(
    model: nn.Module, modifiers: Iterable[Any], weights: WeightSource = _own_weight
) -> dict | None:
    """The sparsity metadata of what the modifiers that produce sparsity pruned, or None.

    One builder for every job: the modules are those the modifiers target, the structure the
    last one's declared pattern (or, for a modifier that only keeps a mask, the N:M pattern
    all pruned modules measure), targets and ignores the recipe's own patterns; the output
    head is always left out.
    """
    pruners = [m for m in modifiers if "sparsity" in m.produces]
    if not pruners:
        return None
    names = sorted({name for m in pruners for name in m.targeted_modules()})
    declared = [m.mask_pattern for m in pruners if m.mask_pattern is not None]
    structure = declared[-1] if declared else _measured_structure(model, names, weights)
    return sparsity_config(
        model,
        names,
        structure=structure,
        targets=sorted({t for m in pruners for t in m.targets}),
        ignore=sorted({i for m in pruners for i in m.ignore} | output_head_names(model)),
        weights=weights,
    )


def _measured_structure(model: nn.Module, names: list[str], weights: WeightSource) -> str:
    """The N:M pattern every pruned module holds, else "unstructured"."""
    report = layer_sparsity_report(model, names, weights)
    patterns = {info["nm"] for info in report.values() if info["sparsity"] > 0}
    return next(iter(patterns)) if len(patterns) == 1 and None not in patterns else "unstructured"


#: A run warns when the whole decoder reaches less than this fraction of the targeted sparsity.
DECODER_SPARSITY_WARN_FRACTION = 0.9


def _decoder_weights(
    model: nn.Module, weights: WeightSource
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every Linear-like weight but the output head, each expert of fused 3-D expert weights
    (Mixtral, Qwen3-MoE in transformers 5) as its own matrix; one at a time, because a streamed
    run reads each from disk and must not hold them all."""
    attach_expert_slices(model)
    for name, module in _default_modules(model).items():
        if isinstance(module, ExpertSlice):
            if not module.weight.is_meta:
                yield name, weight_matrix(module)
        else:
            yield name, weights(name, module)


def sparsity_metrics(
    model: nn.Module, modifiers: Iterable[Any], weights: WeightSource = _own_weight
) -> dict[str, Any]:
    """`decoder_sparsity` over every weight matrix of the decoder (experts included) and
    `targeted_sparsity` over those the pruning modifiers targeted; with `skipped`, the weights
    left dense when the decoder reaches less than 90% of the targeted sparsity."""
    targeted = {name for m in modifiers if "sparsity" in m.produces for name in m.targeted_modules()}
    if not targeted:
        return {}
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name, matrix in _decoder_weights(model, weights):
        zeros[name], sizes[name] = int((matrix == 0).sum()), matrix.numel()
    hit = [name for name in sizes if name in targeted]
    targeted_sparsity = sum(zeros[n] for n in hit) / max(1, sum(sizes[n] for n in hit))
    decoder_sparsity = sum(zeros.values()) / max(1, sum(sizes.values()))
    metrics: dict[str, Any] = {"decoder_sparsity": decoder_sparsity, "targeted_sparsity": targeted_sparsity}
    if decoder_sparsity < DECODER_SPARSITY_WARN_FRACTION * targeted_sparsity:
        metrics["skipped"] = sorted(n for n in sizes if n not in targeted)
    return metrics


def warn_low_decoder_sparsity(metrics: dict[str, Any]) -> None:
    """Say on stderr which weights a pruning run left dense when they dilute its sparsity."""
    skipped = metrics.pop("skipped", None)
    if not skipped:
        return
    shown = ", ".join(skipped[:6]) + (f" and {len(skipped) - 6} more" if len(skipped) > 6 else "")
    print(
        f"warning: the decoder is {metrics['decoder_sparsity']:.1%} sparse, less than 90% of the "
        f"{metrics['targeted_sparsity']:.1%} reached on the targeted weights; left dense: "
        f"{shown}. Add them to targets to prune them.",
        file=sys.stderr,
    )
