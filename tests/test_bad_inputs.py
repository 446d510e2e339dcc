"""Bad inputs, as a user would give them: each case in tests/bad_inputs/ is one YAML file.

A case names a `maker` below (what to break), the command line (with {model}, {out}, {recipe},
{calib} filled in), the expected exit status and a substring of the message. Every case must
end in that status with a one-paragraph message on stderr, no traceback, no new file or folder
(visible or hidden) beside the output, and any previous output byte-for-byte untouched.
Optional fields: `recipe` (a key of RECIPES), `previous_output: true` (an output folder exists
before the run), `stream: out` (the message is on stdout), `creates_output: true` (a warning case
whose run completes).
SHOW_BAD_INPUT_MESSAGES=1 (with -s) prints each case's stderr, to read the messages whole.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from reciprune.cli import main

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))

SPARSEGPT_50 = """
pruning_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      targets: ["Linear"]
      ignore: ["lm_head"]
"""
TWO_FOUR = SPARSEGPT_50.replace("sparsity: 0.5", 'mask_structure: "2:4"')
FINETUNE = """
finetune_stage:
  finetuning_modifiers:
    ConstantPruningModifier:
      targets: ["re:model.layers.*"]
"""
NO_SPARSITY = SPARSEGPT_50.replace("      sparsity: 0.5\n", "")
RECIPES = {"sparsegpt_50": SPARSEGPT_50, "two_four": TWO_FOUR, "finetune": FINETUNE,
           "no_sparsity": NO_SPARSITY}  # fmt: skip


@dataclass
class Setup:
    """The files one case starts from; makers break one of them."""

    tmp: Path
    model: Path
    recipe: Path
    calib: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    tiny_llama: Callable
    tokenizer: object
    fills: dict[str, str] = field(default_factory=dict)


def _weights(setup: Setup) -> Path:
    return setup.model / "model.safetensors"


def _rewrite_weights(setup: Setup, change: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(_weights(setup))
    change(tensors)
    save_file(tensors, _weights(setup), metadata={"format": "pt"})


def _set_first_up_proj(value: float) -> Callable[[Setup], None]:
    def make(setup: Setup) -> None:
        def change(tensors: dict) -> None:
            tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = value

        _rewrite_weights(setup, change)

    return make


def _interrupt(target: str) -> Callable[[Setup], None]:
    def make(setup: Setup) -> None:
        def stop(*args, **kwargs):
            raise KeyboardInterrupt

        setup.monkeypatch.setattr(target, stop)

    return make


def _edit_config(setup: Setup, **changes: object) -> None:
    path = setup.model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _place(setup: Setup, key: str, file: Path, text: str, below: str = "") -> None:
    """Write `file` and point the argument `key` at it (or at `file/below`)."""
    file.write_text(text)
    setup.fills[key] = str(file / below) if below else str(file)


def _output_where_the_kernel_refuses_files(setup: Setup) -> None:
    """/sys refuses new files even to root, whom access() tells it may write: a real folder that
    cannot be written on any Linux machine (tests run as root, so permissions prove nothing)."""
    from reciprune.outputs import write_refused

    if not Path("/sys").is_dir() or write_refused(Path("/sys")) is None:
        pytest.skip("needs a Linux /sys that refuses new files")
    setup.fills["out"] = f"/sys/reciprune-bad-input-{os.getpid()}/out"


def _save_tiny(setup: Setup, **overrides: object) -> None:
    setup.tiny_llama(**overrides).save_pretrained(setup.model)


MAKERS: dict[str, Callable[[Setup], None]] = {
    "none": lambda setup: None,
    "safetensors_truncated": lambda s: _weights(s).write_bytes(_weights(s).read_bytes()[:5000]),
    "safetensors_header_corrupt": lambda s: _weights(s).write_bytes(
        (2**40).to_bytes(8, "little") + _weights(s).read_bytes()[8:]
    ),
    "safetensors_zero_byte": lambda s: _weights(s).write_bytes(b""),
    "safetensors_random_bytes": lambda s: _weights(s).write_bytes(os.urandom(4096)),
    "output_parent_is_a_file": lambda s: _place(s, "out", s.tmp / "afile", "x", "out"),
    "output_in_a_system_folder": _output_where_the_kernel_refuses_files,
    "output_is_model": lambda s: s.fills.update(out=str(s.model)),
    "output_inside_model": lambda s: s.fills.update(out=str(s.model / "pruned")),
    "alias_bomb_recipe": lambda s: s.recipe.write_text(
        'a: &a ["lm_head","lm_head","lm_head","lm_head","lm_head","lm_head","lm_head","lm_head"]\n'
        + "".join(f"{n}: &{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                  for p, n in zip("abcdefgh", "bcdefghi", strict=True))  # fmt: skip
        + SPARSEGPT_50.replace('["lm_head"]', "*i")
    ),
    "huge_value_recipe": lambda s: s.recipe.write_text(
        SPARSEGPT_50 + "      block_size: " + "x" * 1_000_000 + "\n"
    ),
    "binary_calibration": lambda s: s.calib.write_bytes(os.urandom(20000)),
    "one_row_json": lambda s: _place(s, "calib", s.tmp / "one.json", '[{"text": "one row"}]'),
    "missing_tokenizer": lambda s: [
        p.unlink() for p in s.model.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))
    ],
    "unknown_model_type": lambda s: _edit_config(s, model_type="notamodel"),
    "width_66": lambda s: _save_tiny(s, intermediate_size=66),
    "nan_weights": _set_first_up_proj(float("nan")),
    "inf_weights": _set_first_up_proj(float("inf")),
    "huge_weights": lambda s: _rewrite_weights(
        s, lambda t: t["model.layers.0.mlp.up_proj.weight"].fill_(1e38)
    ),
    "interrupt_load": _interrupt("transformers.AutoModelForCausalLM.from_pretrained"),
    "interrupt_save": _interrupt("reciprune.export.save.dump_json"),
    "interrupt_calibration": _interrupt(
        "reciprune.pipelines.calibration.layerwise.LayerwisePipeline.walk"
    ),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _setup(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer, case: dict) -> Setup:
    from reciprune.data.embedded import embedded_calibration_texts

    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[case.get("recipe", "sparsegpt_50")])
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(embedded_calibration_texts()[:20]))
    setup = Setup(tmp_path, model, recipe, calib, tmp_path / "out", monkeypatch, tiny_llama,
                  tiny_tokenizer)  # fmt: skip
    setup.fills = {"model": str(model), "recipe": str(recipe), "calib": str(calib),
                   "out": str(setup.out)}  # fmt: skip
    if case.get("previous_output"):
        setup.out.mkdir()
        (setup.out / "config.json").write_text('{"previous": true}')
    return setup


def test_the_corpus_covers_the_reported_cases() -> None:
    assert len(CASES) >= 20
    assert {yaml.safe_load(p.read_text())["maker"] for p in CASES} <= set(MAKERS)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_input_fails_cleanly(path: Path, tmp_path, monkeypatch, tiny_llama, tiny_tokenizer, capsys):
    case = yaml.safe_load(path.read_text())
    setup = _setup(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer, case)
    MAKERS[case["maker"]](setup)
    before = {p.name for p in tmp_path.iterdir()}
    model_before = _snapshot(setup.model)
    out_before = _snapshot(setup.out) if setup.out.is_dir() else None
    capsys.readouterr()
    try:
        status = main([arg.format(**setup.fills) for arg in case["argv"]])
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    err = captured.err
    if os.environ.get("SHOW_BAD_INPUT_MESSAGES"):
        print(f"\n[{path.stem}] {err}", file=sys.__stdout__)
    assert status == case["exit"], err
    assert case["message"] in (captured.out if case.get("stream") == "out" else err), captured
    assert "Traceback" not in err and len(err) < 2000, err
    if status != 0:
        message = [line for line in err.splitlines() if line.startswith(("error:", "interrupted"))]
        assert len(message) == 1, err
    made = {"out"} if case.get("creates_output") else set()
    assert {p.name for p in tmp_path.iterdir()} == before | made, "a new file or folder was left"
    assert _snapshot(setup.model) == model_before, "the model folder changed"
    if out_before is not None:
        assert _snapshot(setup.out) == out_before, "the previous output changed"


# the output path ----------------------------------------------------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_into_a_locked_output_fails_at_once(tmp_path, capsys) -> None:
    from reciprune.outputs import output_lock

    out, recipe = tmp_path / "out", tmp_path / "recipe.yaml"
    recipe.write_text(SPARSEGPT_50)
    with output_lock(out):
        # A model that does not exist would fail later; the lock must be what stops this run.
        status = main(["oneshot", "--recipe", str(recipe), "--model", str(tmp_path / "nowhere"),
                       "--output-dir", str(out)])  # fmt: skip
        err = capsys.readouterr().err
        assert status == 2 and "is writing" in err and f"process {os.getpid()}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"], "lock file removed"


def test_stale_hidden_folders_of_a_dead_writer_are_cleaned_with_a_note(tmp_path, capsys) -> None:
    from reciprune.outputs import clean_stale_siblings

    out, dead, live = tmp_path / "out", _dead_pid(), os.getpid()
    for kind, pid in (("tmp", dead), ("old", dead), ("tmp", live)):
        (tmp_path / f".out.{kind}-{pid}-abc").mkdir()
    (tmp_path / f".out.old-{dead}-abc" / "config.json").write_text("{}")
    clean_stale_siblings(out)
    err = capsys.readouterr().err
    # The dead writer's previous checkpoint was stranded between two renames: it is put back.
    assert (out / "config.json").read_text() == "{}" and "restored" in err
    assert f"removed {tmp_path / f'.out.tmp-{dead}-abc'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{live}-abc", "out"]


def test_saved_files_and_folder_follow_the_umask(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    from reciprune.export.save import save_checkpoint

    previous = os.umask(0o022)
    try:
        out = save_checkpoint(tiny_llama(), tiny_tokenizer, tmp_path / "out", recipe_yaml="",
                              manifest={})  # fmt: skip
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        (p.name for p in out.iterdir()), 0o644
    )
