"""Export: a saved checkpoint reloads with plain transformers and keeps every zero; saving is atomic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from reciprune.core.targets import is_linear_like
from reciprune.errors import ReciPruneError
from reciprune.export import (
    build_manifest,
    git_revision,
    layer_sparsity_report,
    package_versions,
    save_checkpoint,
    sha256_text,
    sparsity_config,
)
from reciprune.export.formats import CheckpointContents
from reciprune.models import ModelSource

RECIPE = "stage:\n  pruning:\n    MagnitudePruningModifier:\n      sparsity: 0.5\n"


def prune_half(model: torch.nn.Module) -> list[str]:
    """Zero the smaller half of every decoder Linear's weights; return the pruned names."""
    names = []
    for name, module in model.named_modules():
        if is_linear_like(module) and name.startswith("model.layers."):
            w = module.weight.data
            w[w.abs() <= w.abs().flatten().median()] = 0
            names.append(name)
    return names


def prune_2of4(weight: torch.Tensor) -> None:
    groups = weight.view(weight.shape[0], -1, 4)
    smallest = groups.abs().topk(2, dim=-1, largest=False).indices
    groups.scatter_(-1, smallest, 0)


def manifest_for(model: torch.nn.Module) -> dict:
    return build_manifest(
        recipe_yaml=RECIPE,
        model_source=ModelSource("tiny", "/tmp/tiny", "abc"),
        data_fingerprint="data123",
        seed=42,
        metrics={"ppl": torch.tensor(12.5), "path": Path("/x")},
        timings={"total_s": 1.0},
        layers=layer_sparsity_report(model),
        extra={"stage": "pruning"},
    )


def save(model, tokenizer, out: Path, **kwargs) -> Path:
    return save_checkpoint(
        model, tokenizer, out, recipe_yaml=RECIPE, manifest=manifest_for(model), **kwargs
    )


@pytest.mark.parametrize("tied", [False, True])
def test_saved_model_reloads_with_every_zero(tmp_path, tiny_llama, tiny_tokenizer, tied) -> None:
    model = tiny_llama(tie_word_embeddings=tied)
    names = prune_half(model)
    meta = sparsity_config(model, names, structure="unstructured", ignore=["lm_head"])
    out = save(model, tiny_tokenizer, tmp_path / "out", contents=CheckpointContents(sparsity=meta))

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    for key, value in original.items():
        assert torch.equal(value.eq(0), loaded[key].eq(0)), key
        assert torch.equal(value, loaded[key]), key
    ids = torch.tensor([[3, 17, 42, 99, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    if tied:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.config.sparsity_config["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert AutoConfig.from_pretrained(out).hidden_size == 32


def test_output_folder_contents(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    model = tiny_llama()
    names = prune_half(model)
    meta = sparsity_config(model, names, structure="unstructured", ignore=["lm_head"])
    out = save(model, tiny_tokenizer, tmp_path / "out", contents=CheckpointContents(sparsity=meta))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml"} <= files
    assert (out / "recipe.yaml").read_text() == RECIPE
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"] == meta
    manifest = json.loads((out / "reciprune_manifest.json").read_text())
    for key in (
        "created_utc",
        "recipe_sha256",
        "model",
        "data_fingerprint",
        "seed",
        "metrics",
        "timings",
        "layers",
        "versions",
        "git_revision",
        "stage",
    ):
        assert key in manifest, key
    assert manifest["recipe_sha256"] == sha256_text(RECIPE)
    assert manifest["metrics"] == {"ppl": 12.5, "path": "/x"}
    assert manifest["model"] == {"spec": "tiny", "path": "/tmp/tiny", "fingerprint": "abc"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", manifest["created_utc"])
    assert "lm_head" not in manifest["layers"]
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["sparsity"] == pytest.approx(0.5, 0.01)


def test_sparsity_config_fields_match_compressed_tensors(tiny_llama) -> None:
    from compressed_tensors.config import SparsityCompressionConfig

    model = tiny_llama()
    names = prune_half(model)
    meta = sparsity_config(model, names, structure="unstructured", ignore=["lm_head"])
    assert meta["format"] == "dense" and meta["sparsity_structure"] == "unstructured"
    assert meta["targets"] == names and meta["ignore"] == ["lm_head"]
    assert meta["registry_requires_subclass"] is False
    zeros = sum(int(model.get_submodule(n).weight.eq(0).sum()) for n in names)
    numel = sum(model.get_submodule(n).weight.numel() for n in names)
    assert meta["global_sparsity"] == pytest.approx(zeros / numel)
    fields = {k: v for k, v in meta.items() if k not in ("format", "registry_requires_subclass")}
    parsed = SparsityCompressionConfig.load_from_registry(meta["format"], **fields)
    assert parsed.model_dump(mode="json") == meta
    patterns = sparsity_config(model, names, structure="2:4", ignore=[], targets=["Linear"])
    assert patterns["targets"] == ["Linear"] and patterns["sparsity_structure"] == "2:4"
    assert patterns["global_sparsity"] == meta["global_sparsity"]


def test_layer_report_detects_nm_patterns(tiny_llama) -> None:
    model = tiny_llama()
    layer = model.model.layers[0]
    prune_2of4(layer.mlp.up_proj.weight.data)
    down = layer.mlp.down_proj.weight.data  # 4:8 but not 2:4: zeros packed in the first half
    down.view(down.shape[0], -1, 8)[:, :, :4] = 0
    report = layer_sparsity_report(model)
    assert "lm_head" not in report
    assert len(report) == sum(1 for n, m in model.named_modules() if is_linear_like(m)) - 1
    assert report["model.layers.0.mlp.up_proj"]["nm"] == "2:4"
    assert report["model.layers.0.mlp.up_proj"]["sparsity"] == 0.5
    assert report["model.layers.0.mlp.down_proj"]["nm"] == "4:8"
    assert report["model.layers.0.self_attn.q_proj"] == {
        "sparsity": 0.0,
        "shape": [32, 32],
        "numel": 1024,
        "zeros": 0,
        "nm": None,
    }
    only = layer_sparsity_report(model, ["lm_head"])
    assert list(only) == ["lm_head"] and only["lm_head"]["shape"] == [320, 32]


def test_existing_output_is_refused_before_writing(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ReciPruneError, match="--output-dir.*--overwrite"):
        save(tiny_llama(), tiny_tokenizer, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    save(tiny_llama(), tiny_tokenizer, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "empty").mkdir()
    save(tiny_llama(), tiny_tokenizer, tmp_path / "empty")  # an empty folder is fine


def test_failure_mid_save_leaves_nothing(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch) -> None:
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        save(tiny_llama(), tiny_tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    # With --overwrite, a failed save keeps the previous checkpoint.
    previous = tmp_path / "prev"
    previous.mkdir()
    (previous / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        save(tiny_llama(), tiny_tokenizer, previous, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["prev"]
    assert (previous / "model.safetensors").read_text() == "old"


def test_failed_final_rename_restores_previous(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    from reciprune.export import save as save_module

    previous = tmp_path / "prev"
    previous.mkdir()
    (previous / "model.safetensors").write_text("old")
    real_replace = save_module.os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".prev.tmp-"):  # the new checkpoint moving into place
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save(tiny_llama(), tiny_tokenizer, previous, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["prev"]
    assert (previous / "model.safetensors").read_text() == "old"


def test_manifest_helpers() -> None:
    versions = package_versions()
    for name in (
        "reciprune",
        "torch",
        "transformers",
        "datasets",
        "compressed-tensors",
        "pydantic",
        "python",
    ):
        assert versions[name], name
    revision = git_revision()
    assert revision is None or re.fullmatch(r"[0-9a-f]{40}", revision)
    assert sha256_text("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(ValueError, match="reserved"):
        build_manifest(
            recipe_yaml="",
            model_source=ModelSource("a", "b", "c"),
            data_fingerprint=None,
            seed=None,
            metrics={},
            timings={},
            layers={},
            extra={"seed": 1},
        )
