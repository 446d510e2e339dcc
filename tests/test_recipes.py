"""Every checked-in recipe parses, and runs end to end with `reciprune run` on a tiny Llama.

Paper-scale settings are shrunk with `--set` (2 training steps on ASDiv examples of at most 160 tokens, a few
short calibration samples); what a recipe does (its stages, modifiers, targets, teachers) is run
as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reciprune.cli import main
from reciprune.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
SMALL_TRAINING = {
    "dataset": "asdiv",  # registry data sets (gsm8k) need the network
    "max_steps": 2,
    "max_seq_length": 160,
    "per_device_train_batch_size": 2,
    "global_batch_size": "null",
    "eval_samples": 2,
    "precision": "float32",
}


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO / "recipes")) for p in paths]


#: One folder per seed method: paper-scale recipe(s), SCALE.md and a SmolLM2 twin (smollm2*.yaml).
METHOD_FOLDERS = ("sparse_llama2_7b_gsm8k", "dsnot", "owl", "ist", "row_sparse", "spiel")


def test_there_are_recipes_for_each_seed_method() -> None:
    names = set(_ids(RECIPES))
    assert "sparse_llama2_7b_gsm8k/pipeline.yaml" in names
    for method in METHOD_FOLDERS:
        folder = REPO / "recipes" / method
        recipes = sorted(p.name for p in folder.glob("*.yaml"))
        twins = [n for n in recipes if n.startswith("smollm2")]
        assert twins, f"recipes/{method}/ has no small-scale twin (smollm2*.yaml)"
        assert set(recipes) - set(twins), f"recipes/{method}/ has no paper-scale recipe"
        scale = (folder / "SCALE.md").read_text(encoding="utf-8")
        assert "Published numbers" in scale, f"recipes/{method}/SCALE.md lacks published numbers"
        for name in recipes:  # every recipe of the folder is described in its SCALE.md
            assert name in scale, f"recipes/{method}/SCALE.md does not mention {name}"


def test_row_sparse_has_its_quantized_base_variant() -> None:
    folder = REPO / "recipes" / "row_sparse"
    assert list(folder.glob("*4bit_residual.yaml*")), "the quantized-base recipe is missing"


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_runs_on_a_tiny_model(path: Path, tmp_path: Path, tiny_llama, tiny_tokenizer) -> None:
    recipe = load_recipe(path)
    model = tmp_path / "model"
    tiny_llama(num_hidden_layers=2).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    args = ["run", "--recipe", str(path), "--model", str(model), "--output-dir",
            str(tmp_path / "out"), "--dataset", "asdiv", "--num-calibration-samples", "4",
            "--calibration-seq-length", "32", "--no-eval-ppl", "--no-progress"]  # fmt: skip
    for stage in recipe.stages:
        if stage.run_type != "finetune":
            continue
        args += [f"--set={stage.name}.training.{k}={v}" for k, v in SMALL_TRAINING.items()]
        written = stage.training.distill_teacher if stage.training else None
        if any(m.needs_teacher for m in stage.modifiers) and written is None:
            args += ["--distill-teacher", "base"]  # a standalone step: its teacher is a flag
    assert main(args) == 0

    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == recipe.stage_names
    sparsity = 0.0
    for stage in recipe.stages:
        folder = tmp_path / "out" / stage.name
        manifest = json.loads((folder / "reciprune_manifest.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        decoder = {k: v for k, v in weights.items() if ".layers." in k and "proj.weight" in k}
        zeros = sum(int((v == 0).sum()) for v in decoder.values())
        now = zeros / sum(v.numel() for v in decoder.values())
        if stage.run_type == "finetune":
            assert len(manifest["loss_curve"]) == 2
            if any(m.type_name() == "ConstantPruningModifier" for m in stage.modifiers):
                assert now >= sparsity - 1e-9, f"{stage.name} lost zeros: {sparsity} -> {now}"
            if any(m.needs_teacher for m in stage.modifiers):
                assert all("distill_loss" in r for r in manifest["loss_curve"])
        sparsity = now


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_to_yaml_of_every_recipe_loads_back_to_an_equal_recipe(path: Path) -> None:
    recipe = load_recipe(path)
    assert load_recipe(recipe.to_yaml()) == recipe


def test_a_dense_finetune_stage_and_stage_settings_round_trip_through_to_yaml() -> None:
    from reciprune.recipe import Recipe
    from reciprune.recipe.options import CalibrationOptions
    from reciprune.recipe.schema import Stage
    from reciprune.recipe.training import TrainingConfig

    dense = Recipe(stages=[Stage(name="finetune_stage", run_type="finetune")])
    assert "modifiers: []" in dense.to_yaml()
    assert load_recipe(dense.to_yaml()) == dense
    both = load_recipe(
        "stages:\n"
        "  - {name: prune, modifiers: [{type: WandaModifier, sparsity: 0.5}],\n"
        "     calibration: {num_calibration_samples: 8, max_seq_length: 64}}\n"
        "  - {name: tune, run_type: finetune, training: {max_steps: 3, learning_rate: 1.0e-4}}\n"
    )
    assert both.stages[0].calibration == CalibrationOptions(num_calibration_samples=8, max_seq_length=64)
    assert both.stages[1].training == TrainingConfig(max_steps=3, learning_rate=1e-4)
    again = load_recipe(both.to_yaml())
    assert again == both
    assert again.stages[0].calibration.given() == {"num_calibration_samples": 8, "max_seq_length": 64}
