"""Export: save_pretrained + recipe.yaml + manifest + compressed-tensors sparsity metadata."""

from reciprune.export.manifest import (
    build_manifest,
    git_revision,
    layer_sparsity_report,
    package_versions,
    sha256_text,
    sparsity_config,
)
from reciprune.export.save import save_checkpoint

__all__ = [
    "build_manifest",
    "git_revision",
    "layer_sparsity_report",
    "package_versions",
    "save_checkpoint",
    "sha256_text",
    "sparsity_config",
]
