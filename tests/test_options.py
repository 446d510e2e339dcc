"""Options as data: flags derived from the options models, recipe stage settings, job files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reciprune.cli import build_parser, main
from reciprune.errors import RecipeError, ReciPruneError
from reciprune.pipelines.jobs import FinetuneJob, OneshotJob, RunJob, dump_job, load_job
from reciprune.recipe import load_recipe
from reciprune.recipe.options import (
    CalibrationOptions,
    EvalOptions,
    ModelOptions,
    OutputOptions,
    PerplexityOptions,
)
from reciprune.recipe.training import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
WANDA = REPO / "recipes" / "quickstart" / "wanda_50.yaml"


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def _flags(name: str) -> set[str]:
    return {flag for action in _subparser(name)._actions for flag in action.option_strings}


@pytest.mark.parametrize(
    ("command", "models"),
    [
        ("oneshot", (ModelOptions, CalibrationOptions, PerplexityOptions)),
        ("run", (ModelOptions, CalibrationOptions, PerplexityOptions)),
        ("finetune", (ModelOptions, PerplexityOptions, TrainingConfig)),
        ("eval", (ModelOptions, EvalOptions)),
    ],
)
def test_every_option_field_is_a_flag_of_its_commands(command, models):
    flags = _flags(command)
    for model in models:
        for name, info in model.model_fields.items():
            spelling = f"--{name.replace('_', '-')}"
            if info.annotation is bool and model.field_meta(name).get("switch") == "off":
                spelling = f"--no-{name.replace('_', '-')}"
            assert spelling in flags, f"{command} lacks {spelling} ({model.__name__}.{name})"


def test_flags_not_given_keep_the_models_defaults_and_given_ones_are_marked():
    args = build_parser().parse_args(
        ["oneshot", "--recipe", "r.yaml", "--output-dir", "o", "--calibration-seq-length", "64"]
    )
    from reciprune.cli_options import options_from

    calibration = options_from(args, CalibrationOptions)
    assert calibration.max_seq_length == 64 and calibration.num_calibration_samples == 64
    assert calibration.model_fields_set == {"max_seq_length"}
    assert options_from(args, OutputOptions).progress is True


def test_one_flag_name_for_the_calibration_length_in_oneshot_and_run():
    for command in ("oneshot", "run"):
        assert {"--max-seq-length", "--calibration-seq-length"} <= _flags(command), command


def test_a_bad_flag_value_names_the_flag_and_what_it_is(tmp_path, capsys):
    code = main(["oneshot", "--recipe", str(WANDA), "--output-dir", str(tmp_path / "o"),
                 "--num-calibration-samples", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--num-calibration-samples (Calibration sequences)" in err
    assert "greater than 0" in err and not (tmp_path / "o").exists()


def test_a_oneshot_stage_may_set_its_calibration_and_flags_override_it():
    recipe = load_recipe(
        "prune:\n  calibration: {num_calibration_samples: 8, max_seq_length: 64}\n"
        "  pruning_modifiers:\n    WandaModifier: {sparsity: 0.5}\n"
    )
    output = OutputOptions(output_dir="o")
    job = OneshotJob(recipe=recipe, output=output)
    options = job.stage_calibration(recipe.stages[0])
    assert (options.num_calibration_samples, options.max_seq_length, options.seed) == (8, 64, 42)
    flagged = OneshotJob(recipe=recipe, output=output, calibration=CalibrationOptions(max_seq_length=32))
    options = flagged.stage_calibration(recipe.stages[0])
    assert (options.num_calibration_samples, options.max_seq_length) == (8, 32)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("  calibration: {num_samples: 8}\n", "calibration › num_samples: unknown calibration option"),
        ("  calibration: {max_seq_length: 0}\n", "calibration › max_seq_length: Input should be greater than 0"),
        ("  calibration: 8\n", "calibration: 'calibration:' must be a mapping"),
        ("  run_type: finetune\n  calibration: {seed: 1}\n", "calibration: 'calibration:' sets oneshot"),
    ],
)
def test_bad_stage_settings_name_the_stage_and_field(body, message):
    text = "prune:\n" + body + "  pruning_modifiers:\n    ConstantPruningModifier: {}\n"
    with pytest.raises(RecipeError, match="prune › " + message.replace("(", r"\(")):
        load_recipe(text)


def test_set_reaches_a_stages_calibration():
    text = "prune:\n  pruning_modifiers:\n    WandaModifier: {sparsity: 0.5}\n"
    recipe = load_recipe(text, ["prune.calibration.num_calibration_samples=12"])
    assert recipe.stages[0].calibration.num_calibration_samples == 12


def test_jobs_round_trip_through_their_json_file(tmp_path):
    recipe = load_recipe(
        "tune:\n  run_type: finetune\n  training: {max_steps: 3}\n"
        "  constant_modifiers:\n    ConstantPruningModifier: {}\n"
    )
    job = FinetuneJob(
        recipe=recipe,
        output=OutputOptions(output_dir=tmp_path / "out", progress=False),
        model=ModelOptions(model="some/model"),
        training=TrainingConfig(max_steps=3, learning_rate=1e-3),
        evaluation=PerplexityOptions(eval_ppl=False),
    )
    again = load_job(json.loads(json.dumps(dump_job(job), default=str)))
    assert again == job and isinstance(again, FinetuneJob)
    run = RunJob(recipe=recipe, output=OutputOptions(output_dir=tmp_path / "run"),
                 calibration=CalibrationOptions(dataset="asdiv"))  # fmt: skip
    assert load_job(json.loads(json.dumps(dump_job(run), default=str))) == run
    assert dump_job(run)["options"]["calibration"] == {"dataset": "asdiv"}


def test_from_manifest_refuses_recorded_flags_by_either_spelling(tmp_path, capsys):
    for flag in ("--max-seq-length", "--calibration-seq-length"):
        code = main(["run", "--from-manifest", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                     flag, "64"])  # fmt: skip
        assert code == 2 and "--max-seq-length cannot be given" in capsys.readouterr().err


def test_validation_errors_of_options_are_user_errors():
    from reciprune.recipe.options import validate_options

    with pytest.raises(ReciPruneError, match="--ppl-samples"):
        validate_options(PerplexityOptions, {"ppl_samples": -1})


def test_the_pipeline_option_picks_the_calibration_pipeline_and_bad_names_fail_early(
    tiny_model_dir, text_files, tmp_path, capsys, monkeypatch
):
    import reciprune.pipelines.oneshot as oneshot

    args = ["oneshot", "--recipe", str(REPO / "recipes" / "quickstart" / "magnitude_50.yaml"),
            "--model", str(tiny_model_dir), "--no-eval-ppl", "--no-progress"]  # fmt: skip
    monkeypatch.setattr(oneshot, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main([*args, "--output-dir", str(tmp_path / "a"), "--pipeline", "nope"]) == 2
    assert "unknown calibration pipeline 'nope'" in capsys.readouterr().err
    monkeypatch.undo()
    for name in ("data_free", "layerwise"):
        out = tmp_path / name
        assert main([*args, "--output-dir", str(out), "--pipeline", name, "--dataset",
                     str(text_files[0]), "--num-calibration-samples", "2",
                     "--max-seq-length", "16"]) == 0  # fmt: skip
        manifest = json.loads((out / "reciprune_manifest.json").read_text())
        assert manifest["options"]["calibration"]["pipeline"] == name
    a = (tmp_path / "data_free" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "layerwise" / "model.safetensors").read_bytes()
