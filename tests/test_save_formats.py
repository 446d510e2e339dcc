"""--save-format and the reload check of compressed saves (issues 15 and 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from reciprune.cli import main
from reciprune.errors import ReciPruneError
from reciprune.export.formats import CheckpointContents, choose_format
from reciprune.export.formats.dense import DenseFormat, StreamedDenseFormat
from reciprune.export.formats.quantized import QuantizedFormat

PRUNE_24_W4A16 = """
modifiers:
  - type: MagnitudePruningModifier
    mask_structure: "2:4"
    targets: ["Linear"]
  - type: QuantizationModifier
    targets: ["Linear"]
    config_groups:
      group_0:
        targets: ["Linear"]
        weights: {num_bits: 4, type: int, strategy: group, group_size: 16, symmetric: true}
"""


def _oneshot(model_dir: Path, tmp_path: Path, out: str, *flags: str) -> int:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PRUNE_24_W4A16)
    return main(["oneshot", "--recipe", str(recipe), "--model", str(model_dir), "--output-dir",
                 str(tmp_path / out), "--no-eval-ppl", "--no-progress", *flags])  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """The tiny model, 2:4 + W4A16 saved with --save-format auto and dense."""
    from conftest import TINY_LLAMA_CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG)).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    folders = {"model": root / "model"}
    for name in ("auto", "dense"):
        assert _oneshot(root / "model", root, name, "--save-format", name) == 0
        folders[name] = root / name
    return folders


def test_auto_packs_quantized_modules_and_stores_everything_else_dense():
    assert type(choose_format(CheckpointContents(quantized=True))) is QuantizedFormat
    assert choose_format(CheckpointContents(quantized=True)).packed
    assert not choose_format(CheckpointContents(quantized=True), "dense").packed
    sparse = {"global_sparsity": 0.5, "sparsity_structure": "2:4"}
    assert type(choose_format(CheckpointContents(sparsity=sparse))) is DenseFormat
    assert type(choose_format(CheckpointContents(streamed=True))) is StreamedDenseFormat


@pytest.mark.parametrize("name", ["sparse-bitmask", "sparse-24-bitmask"])
def test_sparse_formats_are_refused_before_any_weight_loads(name, tmp_path, capsys):
    # A model path that does not exist: the flag must be refused before it is looked at.
    assert _oneshot(tmp_path / "no-model", tmp_path, "out", "--save-format", name) == 2
    err = capsys.readouterr().err
    assert "compressed-tensors" in err and "--save-format auto" in err and "Traceback" not in err
    assert not (tmp_path / "no-model").exists() and not list(tmp_path.glob("*out*"))
    with pytest.raises(ReciPruneError, match="not available"):
        choose_format(CheckpointContents(quantized=True), name)


def test_a_recipe_stage_may_set_the_format(tmp_path):
    from reciprune.recipe import load_recipe

    stage = "s:\n  run_type: oneshot\n  calibration: {save_format: %s}\n  modifiers:\n" \
            "    - {type: MagnitudePruningModifier, sparsity: 0.5}\n"  # fmt: skip
    assert load_recipe(stage % "dense").stages[0].calibration.save_format == "dense"
    with pytest.raises(Exception, match="sparse-bitmask is not available"):
        load_recipe(stage % "sparse-bitmask")


@pytest.mark.parametrize(("name", "stored"), [("auto", "pack-quantized"), ("dense", "dense")])
def test_each_format_reloads_in_plain_transformers_to_the_saved_model(saved, name, stored):
    folder = saved[name]
    manifest = json.loads((folder / "reciprune_manifest.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == stored == manifest["checkpoint"]["format"]
    # Same recipe, same seed: the two formats hold the same quantized model.
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    models = [AutoModelForCausalLM.from_pretrained(saved[n]).eval() for n in ("auto", "dense")]
    with torch.no_grad():
        logits = [m(ids).logits for m in models]
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=0)
    for key, tensor in models[0].state_dict().items():
        if key.endswith(".weight"):
            assert torch.equal(tensor, models[1].state_dict()[key]), key
    q_proj = models[0].model.layers[0].self_attn.q_proj.weight
    assert bool(((q_proj == 0).view(q_proj.shape[0], -1, 4).sum(-1) >= 2).all())  # 2:4 kept


def test_manifest_records_format_and_bytes_and_compare_shows_them(saved, capsys):
    sizes = {}
    for name in ("auto", "dense"):
        checkpoint = json.loads((saved[name] / "reciprune_manifest.json").read_text())["checkpoint"]
        on_disk = sum(f.stat().st_size for f in saved[name].glob("*.safetensors"))
        assert checkpoint["weight_bytes"] == on_disk
        sizes[name] = on_disk
    assert sizes["auto"] < 0.75 * sizes["dense"]  # int4 packing is smaller than floats
    assert main(["compare", str(saved["auto"]), str(saved["dense"])]) == 0
    table = capsys.readouterr().out
    assert "pack-quantized" in table and f"{sizes['auto'] / 1e6:.1f} MB" in table


def test_eval_reads_a_compressed_checkpoint(saved, tmp_path):
    results = tmp_path / "results.json"
    assert main(["eval", "--model", str(saved["auto"]), "--ppl", "--ppl-samples", "2",
                 "--max-seq-length", "32", "--output", str(results), "--no-progress"]) == 0  # fmt: skip
    ppl = json.loads(results.read_text())
    assert "ppl" in json.dumps(ppl) and "inf" not in json.dumps(ppl).lower()


def test_finetune_starts_from_a_compressed_checkpoint(saved, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(saved["auto"]), "--output-dir", str(out),
                 "--max-steps", "2", "--max-seq-length", "32", "--per-device-train-batch-size",
                 "2", "--eval-samples", "2", "--max-train-samples", "8", "--no-eval-ppl",
                 "--no-progress"]) == 0  # fmt: skip
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(trained.config, "quantization_config")  # decompressed, trained dense
    start = AutoModelForCausalLM.from_pretrained(saved["auto"])
    with torch.no_grad():
        start(torch.zeros(1, 2, dtype=torch.long))  # unpacks the int4 weights
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained.state_dict()[name], start.state_dict()[name])


def test_a_save_that_does_not_reload_as_saved_is_an_error_and_writes_nothing(
    saved, tmp_path, capsys, monkeypatch
):
    write = QuantizedFormat.write

    def corrupt(self, model, folder, contents):
        record = write(self, model, folder, contents)
        weights = load_file(folder / "model.safetensors")
        name = next(k for k in weights if k.endswith("weight_scale"))
        weights[name] = weights[name] * 2
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return record

    monkeypatch.setattr(QuantizedFormat, "write", corrupt)
    assert _oneshot(saved["model"], tmp_path, "bad") == 2
    err = capsys.readouterr().err
    assert "does not reload as saved" in err and "Nothing was written" in err
    assert "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if "bad" in p.name]  # no folder, hidden or not


def test_run_save_format_flag_serves_finetune_stages_unless_they_set_their_own(tmp_path):
    from reciprune.pipelines.jobs import RunJob
    from reciprune.pipelines.multistage import _training_for
    from reciprune.recipe import load_recipe
    from reciprune.recipe.options import CalibrationOptions, OutputOptions

    recipe = load_recipe(
        "a: {run_type: finetune, training: {max_steps: 1}}\n"
        "b: {run_type: finetune, training: {save_format: auto}}\n"
    )
    job = RunJob(recipe=recipe, output=OutputOptions(output_dir=tmp_path),
                 calibration=CalibrationOptions(save_format="dense"))  # fmt: skip
    assert _training_for(job, recipe.stages[0]).save_format == "dense"
    assert _training_for(job, recipe.stages[1]).save_format == "auto"
