"""The `reciprune` command line, end to end on tiny models, and its help texts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from reciprune.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def _oneshot_args(recipe: Path, model: Path, data: tuple[Path, Path], out: Path) -> list[str]:
    return [
        "oneshot", "--recipe", str(recipe), "--model", str(model), "--dataset", str(data[0]),
        "--num-calibration-samples", "8", "--max-seq-length", "32", "--ppl-file", str(data[1]),
        "--ppl-samples", "4", "--ppl-seq-length", "32", "--output-dir", str(out), "--no-progress",
    ]


def test_oneshot_saves_a_reloadable_sparse_checkpoint_with_manifest(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = RECIPES / "quickstart" / "sparsegpt_2of4.yaml"
    assert main(_oneshot_args(recipe, tiny_model_dir, text_files, out)) == 0
    printed = capsys.readouterr().out
    assert "ppl_dense" in printed and "ppl_compressed" in printed

    manifest = json.loads((out / "reciprune_manifest.json").read_text())
    assert manifest["metrics"]["ppl_compressed"] > 0 and manifest["metrics"]["ppl_dense"] > 0
    assert manifest["seed"] == 42 and manifest["data_fingerprint"]
    layer = manifest["layers"]["model.layers.1.mlp.down_proj"]
    assert layer["sparsity"] == pytest.approx(0.5) and layer["nm"] == "2:4"
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert "SparseGPTModifier" in (out / "recipe.yaml").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, module in reloaded.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            nonzero = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
            assert int(nonzero.max()) <= 2, name

    assert main(["eval", "--model", str(out), "--ppl", str(text_files[1]), "--ppl-samples", "4",
                 "--max-seq-length", "32", "--no-progress"]) == 0
    assert f"{manifest['metrics']['ppl_compressed']:.4f}" in capsys.readouterr().out

    assert 0 < layer["reconstruction_error"] < 1
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("model.layers.1.mlp.down_proj"))
    assert "50.00%" in row and "2:4" in row and f"{layer['reconstruction_error']:.4f}" in row
    assert (out / "layer_report.png").stat().st_size > 1000


def test_bad_recipe_fails_before_weights_load_and_writes_nothing(tiny_model_dir, text_files, tmp_path, monkeypatch, capsys):
    import reciprune.pipelines.oneshot as jobs

    def no_weights(*_args, **_kwargs):
        raise AssertionError("weights were loaded for a bad recipe")

    monkeypatch.setattr(jobs, "load_model", no_weights)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning_stage:\n  obcq_modifiers:\n    SparseGPTModifier:\n      sparsty: 0.5\n")
    out = tmp_path / "out"
    assert main(_oneshot_args(bad, tiny_model_dir, text_files, out)) == 2
    err = capsys.readouterr().err
    assert "SparseGPTModifier" in err and "did you mean 'sparsity'" in err
    assert not out.exists()


def test_bad_model_path_and_flags_are_clear_errors(tmp_path, text_files, capsys):
    out = tmp_path / "out"
    recipe = RECIPES / "quickstart" / "wanda_50.yaml"
    assert main(_oneshot_args(recipe, tmp_path / "missing-model", text_files, out)) == 2
    assert "missing-model" in capsys.readouterr().err
    args = _oneshot_args(recipe, tmp_path, text_files, out)
    args[args.index("--num-calibration-samples") + 1] = "0"
    assert main(args) == 2
    assert "--num-calibration-samples" in capsys.readouterr().err
    assert not out.exists()


def test_recipe_check_prints_the_plan_without_weights(tiny_model_dir, capsys):
    recipe = RECIPES / "seed" / "sparseml_obcq_50.yaml"
    assert main(["recipe", "check", str(recipe), "--model", str(tiny_model_dir)]) == 0
    plan = capsys.readouterr().out
    assert "pruning_stage" in plan and "SparseGPTModifier" in plan and "× 2 layers" in plan


def test_modifiers_lists_every_registered_modifier(capsys):
    from reciprune.modifiers import available_modifiers

    assert main(["modifiers"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(available_modifiers())
    assert all(len(line.split()) > 3 for line in lines)


def _subparsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_every_command_and_option_has_help():
    for parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(a.help for a in action._choices_actions), parser.prog
            elif action.help != argparse.SUPPRESS:
                assert action.help and len(action.help) > 8, (parser.prog, action.dest)


def test_multi_stage_recipe_runs_one_oneshot_stage_with_stage_flag(tiny_model_dir, text_files, tmp_path, capsys):
    recipe = tmp_path / "tutorial.yaml"
    recipe.write_text(
        "sparsity_stage:\n  run_type: oneshot\n  sparsity_modifiers:\n    WandaModifier:\n"
        "      sparsity: 0.5\n"
        "finetuning_stage:\n  run_type: finetune\n  pruning_modifiers:\n"
        "    ConstantPruningModifier:\n      targets: ['re:.*q_proj.weight', 're:.*up_proj.weight']\n"
        "      start: 0\n"
    )
    out = tmp_path / "out"
    assert main(_oneshot_args(recipe, tiny_model_dir, text_files, out)) == 2
    assert "--stage" in capsys.readouterr().err and not out.exists()
    assert main([*_oneshot_args(recipe, tiny_model_dir, text_files, out), "--stage", "sparsity_stage"]) == 0
    saved = (out / "recipe.yaml").read_text()
    assert "WandaModifier" in saved and "ConstantPruningModifier" not in saved
