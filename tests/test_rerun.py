"""Manifests record what a run needs, and `reciprune run --from-manifest` repeats it exactly.

Every test runs on a 2-layer tiny Llama with a few short calibration samples or training steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from reciprune.cli import main
from reciprune.export.manifest import sha256_text

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MANIFEST = "reciprune_manifest.json"


def _oneshot(model: Path, data: tuple[Path, Path], out: Path) -> list[str]:
    return [
        "oneshot", "--recipe", str(RECIPES / "quickstart" / "sparsegpt_50.yaml"),
        "--set", "pruning_stage.SparseGPTModifier.sparsity=0.6", "--model", str(model),
        "--dataset", str(data[0]), "--num-calibration-samples", "6", "--max-seq-length", "32",
        "--seed", "7", "--ppl-file", str(data[1]), "--ppl-samples", "2", "--output-dir", str(out),
        "--no-progress",
    ]  # fmt: skip


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), f"{name} differs"


def test_oneshot_manifest_records_what_a_rerun_needs(tiny_model_dir, text_files, tmp_path) -> None:
    out = tmp_path / "out"
    assert main(_oneshot(tiny_model_dir, text_files, out)) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["recipe_sha256"] == sha256_text(manifest["recipe"])
    assert manifest["recipe"] == (out / "recipe.yaml").read_text()
    assert "sparsity: 0.6" in manifest["recipe"]  # the --set override is in the recorded recipe
    assert manifest["seed"] == 7 and manifest["data_fingerprint"]
    assert manifest["model"]["fingerprint"] and manifest["versions"]["torch"] == torch.__version__
    options = manifest["options"]
    calibration, evaluation = options["calibration"], options["evaluation"]
    assert calibration["dataset"] == str(text_files[0]) and calibration["seed"] == 7
    assert calibration["num_calibration_samples"] == 6 and calibration["max_seq_length"] == 32
    assert evaluation["ppl_file"] == str(text_files[1]) and evaluation["ppl_samples"] == 2
    assert options["model"]["model"] == str(tiny_model_dir)
    assert "output" not in options and "recipe" not in options
    assert manifest["timings"]["load_model"] >= 0 and "ppl_compressed" in manifest["metrics"]

    new = tmp_path / "again"
    assert main(["run", "--from-manifest", str(out / MANIFEST), "--output-dir", str(new),
                 "--no-progress"]) == 0  # fmt: skip
    _same_weights(out, new)
    again = json.loads((new / MANIFEST).read_text())
    for key in ("recipe_sha256", "data_fingerprint", "seed", "options", "layers"):
        assert again[key] == manifest[key], key
    assert again["metrics"]["ppl_compressed"] == manifest["metrics"]["ppl_compressed"]


def test_finetune_rerun_from_manifest_trains_the_same_weights(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_model_dir), "--dataset", "asdiv", "--max-steps", "2",
            "--max-seq-length", "64", "--per-device-train-batch-size", "2", "--eval-samples", "2",
            "--learning-rate", "3e-3", "--seed", "5", "--no-eval-ppl", "--no-progress",
            "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["training"]["learning_rate"] == 3e-3 and manifest["seed"] == 5
    assert manifest["world_size"] == 1 and manifest["options"]["evaluation"]["eval_ppl"] is False

    new = tmp_path / "ft_again"
    assert main(["run", "--from-manifest", str(out), "--output-dir", str(new), "--no-progress"]) == 0
    _same_weights(out, new)
    again = json.loads((new / MANIFEST).read_text())
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in m["loss_curve"]]
               for m in (again, manifest)]  # fmt: skip
    assert untimed[0] == untimed[1]
    assert again["training"] == manifest["training"]


def test_run_manifest_reruns_every_stage(tiny_model_dir, text_files, tmp_path) -> None:
    out = tmp_path / "run"
    recipe = RECIPES / "quickstart" / "wanda_50.yaml"
    assert main(["run", "--recipe", str(recipe), "--model", str(tiny_model_dir), "--dataset",
                 str(text_files[0]), "--num-calibration-samples", "4", "--calibration-seq-length",
                 "32", "--seed", "3", "--no-eval-ppl", "--no-progress", "--output-dir",
                 str(out)]) == 0  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["run_type"] == "run" and manifest["seed"] == 3
    (stage,) = manifest["stages"]
    stage_manifest = json.loads((out / stage / MANIFEST).read_text())
    assert manifest["data_fingerprint"] == {stage: stage_manifest["data_fingerprint"]}
    assert manifest["timings"]["total"] >= manifest["timings"][stage]
    assert manifest["options"]["calibration"]["max_seq_length"] == 32

    new = tmp_path / "run_again"
    assert main(["run", "--from-manifest", str(out / MANIFEST), "--output-dir", str(new),
                 "--no-progress"]) == 0  # fmt: skip
    _same_weights(out / stage, new / stage)


def test_rerun_refuses_a_changed_model_unless_allowed(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_oneshot(tiny_model_dir, text_files, out)) == 0
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # another model, same weights file
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    rerun = ["run", "--from-manifest", str(out / MANIFEST), "--output-dir", str(tmp_path / "new"),
             "--no-progress"]  # fmt: skip
    assert main(rerun) == 2
    error = capsys.readouterr().err
    assert "has changed since the recorded run" in error and "--allow-model-change" in error
    assert not (tmp_path / "new").exists()  # refused before anything was written
    assert main([*rerun, "--allow-model-change"]) == 0


def test_rerun_refuses_what_it_cannot_repeat(tiny_model_dir, text_files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_oneshot(tiny_model_dir, text_files, out)) == 0
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    new = ["--output-dir", str(tmp_path / "new"), "--no-progress"]

    # Options the manifest records cannot be changed on the command line.
    assert main(["run", "--from-manifest", str(path), "--seed", "1", *new]) == 2
    assert "--seed cannot be given with it" in capsys.readouterr().err

    # An older manifest without the job's options.
    old = dict(manifest)
    del old["options"]
    path.write_text(json.dumps(old))
    assert main(["run", "--from-manifest", str(path), *new]) == 2
    assert "does not record the options it ran with" in capsys.readouterr().err

    # The recipe changed in the manifest and beside it: the recorded hash matches neither.
    edited = {**manifest, "recipe": manifest["recipe"].replace("0.6", "0.7")}
    path.write_text(json.dumps(edited))
    (out / "recipe.yaml").write_text(edited["recipe"])
    assert main(["run", "--from-manifest", str(path), *new]) == 2
    assert "has the recorded hash" in capsys.readouterr().err
    # ... and recipe.yaml beside it is enough when it is the original.
    (out / "recipe.yaml").write_text(manifest["recipe"])
    assert main(["run", "--from-manifest", str(path), *new]) == 0

    # Not a manifest at all.
    (tmp_path / "x.json").write_text("{}")
    assert main(["run", "--from-manifest", str(tmp_path / "x.json"), *new]) == 2
    assert "not a reciprune manifest" in capsys.readouterr().err

