"""What a new user meets first: the examples in `--help` and the README run as written, `run`
reports its stages, logs without a terminal carry no progress bars, and surprising settings warn."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import warnings
from pathlib import Path

import pytest

from reciprune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
#: Arguments that name files a command reads (outputs like out/... are created by the commands).
INPUT_PREFIXES = ("recipes/", "examples/")


def _epilogs() -> dict[str, str]:
    """Every epilog and description of the parser and its subcommands, by command name."""
    texts: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        texts[name] = f"{parser.description or ''}\n{parser.epilog or ''}"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")

    walk(build_parser(), "reciprune")
    return texts


def _help_commands() -> list[str]:
    """`reciprune ...` example lines of the printed --help texts (as a user would copy them)."""
    commands = []
    for text in _epilogs().values():
        commands += [line.strip() for line in text.splitlines()
                     if line.strip().startswith("reciprune ")]  # fmt: skip
    return commands


def _readme_code_lines() -> list[str]:
    """Lines of the README's shell code: fenced blocks (not yaml) and indented blocks."""
    lines, fence = [], None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif (fence is not None and fence != "yaml") or (fence is None and line.startswith("    ")):
            lines.append(line)
    return lines


def _readme_commands() -> list[str]:
    """`reciprune ...` commands of the README's shell code, continuation lines joined."""
    commands = []
    for line in "\n".join(_readme_code_lines()).replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = part.strip()
            for prefix in (".venv/bin/", "$ "):
                words = words.removeprefix(prefix)
            if words.startswith("reciprune "):
                commands.append(words)
    return commands


def _check_command(command: str) -> list[str]:
    """Problems of one example command: missing input files, flags our parser rejects."""
    argv = shlex.split(command, comments=True)[1:]
    problems = [f"{word} does not exist" for word in argv
                if word.startswith(INPUT_PREFIXES) and not (ROOT / word).exists()]  # fmt: skip
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        problems.append("our parser rejects it")
    return problems


def test_help_examples_are_whole_commands_that_parse_and_name_existing_files(capsys):
    commands = _help_commands()
    assert len(commands) >= 8, commands  # the top-level epilog alone has eight
    # A backslash continuation inside the Python string would join two lines with a gap.
    assert not [c for c in commands if "  " in c], commands
    bad = {c: p for c in commands if (p := _check_command(c))}
    capsys.readouterr()  # argparse's own messages for the rejected ones
    assert not bad, bad


def test_readme_commands_parse_and_name_existing_files(capsys):
    commands = _readme_commands()
    assert len(commands) >= 5, commands
    bad = {c: p for c in commands if (p := _check_command(c))}
    capsys.readouterr()
    assert not bad, bad


def test_the_compare_example_names_folders_the_examples_before_it_create():
    epilog = build_parser().epilog
    created = set(re.findall(r"--output-dir (\S+)", epilog))
    compared = re.search(r"reciprune compare ((?:\S+ ?)+)", epilog).group(1).split()
    assert compared and set(compared) <= created, (compared, created)


def test_the_check_catches_a_missing_recipe_and_a_bad_flag(capsys):
    assert _check_command("reciprune oneshot --recipe recipes/none.yaml --output-dir o")
    assert _check_command("reciprune oneshot --recipe recipes/quickstart/sparsegpt_50.yaml --bogus")
    assert not _check_command(
        "reciprune oneshot --recipe recipes/quickstart/sparsegpt_50.yaml --output-dir o"
    )


TWO_STAGE_RECIPE = """\
prune_stage:
  run_type: oneshot
  pruning_modifiers:
    WandaModifier:
      sparsity: 0.5
      targets: ["Linear"]
recover_stage:
  run_type: finetune
  training:
    max_steps: 2
    per_device_train_batch_size: 2
    max_seq_length: 32
    eval_samples: 2
  constant_modifiers:
    ConstantPruningModifier:
      targets: ["Linear"]
"""


def _row(table: str, first: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(first))


def test_run_prints_each_stage_and_a_summary_and_compare_reads_the_run(
    tiny_model_dir, text_files, tmp_path, capsys
):


    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_STAGE_RECIPE)
    out = tmp_path / "run"
    assert main(["run", "--recipe", str(recipe), "--model", str(tiny_model_dir), "--dataset",
                 str(text_files[0]), "--num-calibration-samples", "4", "--calibration-seq-length",
                 "16", "--ppl-file", str(text_files[1]), "--ppl-samples", "2", "--ppl-seq-length",
                 "24", "--no-progress", "--output-dir", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "2 windows of 24 tokens" in printed
    oneshot = json.loads((out / "prune_stage" / "reciprune_manifest.json").read_text())["metrics"]
    finetune = json.loads((out / "recover_stage" / "reciprune_manifest.json").read_text())["metrics"]
    # One window length for the run: the checkpoint the oneshot stage saved reads the same
    # perplexity when the finetune stage loads it.
    assert finetune["ppl_before"] == pytest.approx(oneshot["ppl_compressed"], rel=1e-4)
    assert "stage prune_stage (oneshot) done" in printed
    assert f"ppl_compressed     {oneshot['ppl_compressed']:.4f}" in printed
    assert f"ppl_after          {finetune['ppl_after']:.4f}" in printed
    summary = printed[printed.index("run finished"):]
    assert f"{oneshot['global_sparsity']:.2%}" in _row(summary, "prune_stage")
    assert f"{finetune['ppl_after']:.4f}" in _row(summary, "recover_stage")

    assert main(["compare", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"{finetune['global_sparsity']:.2%}" in _row(table, "sparsity")
    assert f"{finetune['ppl_after']:.4f}" in _row(table, "ppl_after")
    assert _row(table, "weight files").split()[-1] == "MB"
    assert _row(table, "stages").split()[-1] == "prune_stage,recover_stage"

    again = tmp_path / "again"
    assert main(["run", "--from-manifest", str(out), "--output-dir", str(again),
                 "--no-progress"]) == 0  # fmt: skip
    rerun_summary = capsys.readouterr().out
    assert "2 windows of 24 tokens" in rerun_summary
    assert f"{finetune['ppl_after']:.4f}" in _row(rerun_summary[rerun_summary.index("run finished"):],
                                                  "recover_stage")  # fmt: skip


@pytest.fixture(autouse=True)
def _library_bars_back_on(monkeypatch):
    """Commands turn the libraries' bars off for the process: each test starts with them on."""
    import tqdm
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # restored after the test
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(tqdm.tqdm, "__init__", tqdm.tqdm.__dict__["__init__"])
    hf_logging.enable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.mark.parametrize("recipe", ["quickstart/wanda_50.yaml", "quantization/w4a16_gptq.yaml"])
def test_without_a_terminal_no_bar_reaches_the_log_only_plain_lines(
    recipe, tiny_model_dir, text_files, tmp_path, capfd, monkeypatch
):
    import reciprune.progress

    monkeypatch.setattr(reciprune.progress, "PLAIN_EVERY_S", 0.0)  # a line at every update
    capfd.readouterr()
    # Progress is not turned off: stderr (captured) being no terminal is enough. A quantized
    # save runs compressed-tensors, whose own tqdm bars have no switch of their own.
    assert main(["oneshot", "--recipe", f"recipes/{recipe}", "--model",
                 str(tiny_model_dir), "--dataset", str(text_files[0]),
                 "--num-calibration-samples", "4", "--calibration-seq-length", "16",
                 "--ppl-file", str(text_files[1]), "--ppl-samples", "2", "--ppl-seq-length",
                 "16", "--output-dir", str(tmp_path / "out")]) == 0  # fmt: skip
    log = capfd.readouterr().err
    assert "\r" not in log
    assert "Loading weights" not in log and "Writing model shards" not in log
    assert "Compressing model" not in log and "Decompressing model" not in log
    assert re.search(r": 2/2 layer", log) and re.search(r"perplexity: 2/2 window", log), log


def test_mt_bench_answers_need_a_place_when_the_model_is_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    questions = Path(__file__).resolve().parents[1] / "examples" / "mt_bench_questions.jsonl"
    assert main(["eval", "--mt-bench-questions", str(questions), "--limit", "1",
                 "--no-progress"]) == 2  # the embedded model: no folder of its own  # fmt: skip
    assert "--mt-bench-answers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # and nothing was written where the command ran


def test_a_finetune_shorter_than_its_warmup_warns_and_says_what_happens(tiny_model_dir, text_files, tmp_path):
    args = ["finetune", "--model", str(tiny_model_dir), "--dataset", str(text_files[0]),
            "--max-seq-length", "16", "--per-device-train-batch-size", "2", "--eval-samples",
            "2", "--learning-rate", "1e-3", "--no-eval-ppl", "--no-progress"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"warmup_steps=8 is longer than the 2 training steps.*"
                      r"reaches only 2\.50e-04 \(25% of learning_rate=0\.001\)"):  # fmt: skip
        assert main([*args, "--max-steps", "2", "--warmup-steps", "8", "--output-dir",
                     str(tmp_path / "short")]) == 0  # fmt: skip
    curve = json.loads((tmp_path / "short" / "reciprune_manifest.json").read_text())["loss_curve"]
    assert curve[0]["lr"] == 0 and max(p["lr"] for p in curve) <= 2.5e-4  # as the warning says
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="warmup_steps")
        assert main([*args, "--max-steps", "2", "--warmup-steps", "2", "--output-dir",
                     str(tmp_path / "ok")]) == 0  # fmt: skip
