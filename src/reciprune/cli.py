"""`reciprune` command line: oneshot compression, evaluation, recipe checks, modifier listing."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reciprune import __version__
from reciprune.cli_options import add_options, given_flags, options_from
from reciprune.core.distributed import is_main_process
from reciprune.errors import ReciPruneError
from reciprune.modifiers import available_modifiers
from reciprune.outputs import output_lock
from reciprune.pipelines.jobs import FinetuneJob, Job, OneshotJob, RunJob, RunOptions
from reciprune.progress import bars_wanted, quiet_library_bars
from reciprune.recipe import Recipe, Stage, describe_plan, load_recipe
from reciprune.recipe.options import (
    CalibrationOptions,
    EvalOptions,
    LaunchOptions,
    ModelOptions,
    OutputOptions,
    PerplexityOptions,
    flag_name,
    validate_options,
)
from reciprune.recipe.training import TrainingConfig

EPILOG = """examples (after `source .venv/bin/activate`):
  reciprune oneshot --recipe recipes/quickstart/sparsegpt_50.yaml --output-dir out/sgpt50
  reciprune finetune --recipe recipes/quickstart/sparsegpt_50_distill_finetune.yaml --stage sparse_finetune_stage --model out/sgpt50 --distill-teacher embedded:smollm2-135m-instruct --output-dir out/sgpt50_ft
  reciprune run --recipe recipes/quickstart/sparsegpt_50_distill_finetune.yaml --output-dir out/run
  reciprune recipe check recipes/quickstart/sparsegpt_50.yaml
  reciprune eval --model out/sgpt50 --ppl
  reciprune eval --model out/sgpt50 --tasks piqa,boolq,asdiv --limit 200 --save-results
  reciprune compare out/sgpt50 out/sgpt50_ft out/run
  reciprune modifiers
Without --model and --dataset, the embedded SmolLM2-135M-Instruct model and the embedded
Wikipedia passages (BoolQ) are used, so every command works offline."""


_RECIPE_HELP = "Recipe YAML file (SparseML or explicit form)."


def _add_recipe_args(
    parser: argparse.ArgumentParser, positional: bool = False, required: bool = True
) -> None:
    if positional:
        parser.add_argument("recipe", help=_RECIPE_HELP)
    else:
        dense = "" if required else " Without one the model is fine-tuned dense, with no modifier."
        parser.add_argument("--recipe", required=required, help=_RECIPE_HELP + dense)
    _add_override_args(parser)


def _add_override_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.MODIFIER.FIELD=VALUE",
        help="Override one recipe field, e.g. --set pruning_stage.SparseGPTModifier.sparsity=0.6 "
        "(the stage may be left out when the recipe has one). Repeatable.",
    )
    parser.add_argument(
        "--stage", default=None, help="Run only this stage of a multi-stage recipe."
    )


def _add_job_options(
    parser: argparse.ArgumentParser, *, output_help: dict[str, str], skip_output: tuple = ()
) -> None:
    """Model, perplexity and output flags every job command has."""
    add_options(parser, ModelOptions)
    add_options(parser, OutputOptions, skip=skip_output, help=output_help)
    add_options(parser, PerplexityOptions)


#: Each command's one-line help, description and (optional) epilog in `--help`.
COMMAND_TEXTS: dict[str, tuple[str, str, str | None]] = {
    "oneshot": (
        "Prune/compress a model layer by layer on calibration data and save it.",
        "Apply a recipe's oneshot stages layer by layer on calibration data, print dense vs "
        "compressed perplexity, and save a Hugging Face checkpoint with recipe.yaml and "
        "reciprune_manifest.json. Calibration options may also be set in a oneshot stage's "
        "'calibration:' mapping; flags override it.",
        None,
    ),
    "finetune": (
        "Fine-tune a model with a recipe's finetune stage (FSDP2 under torchrun).",
        "Train a model while the stage's modifiers keep masks, distill from a teacher or choose "
        "which parameters learn. One process runs as is; --nproc-per-node N (or torchrun) "
        "shards the model with FSDP2. Saves a Hugging Face checkpoint with recipe.yaml, "
        "reciprune_manifest.json (with the loss curve) and loss_curve.png; with --save-steps, "
        "resumable checkpoints go to OUTPUT_DIR.checkpoints/ until the end.",
        "Training arguments come from the stage's 'training:' mapping in the recipe, then these "
        "flags. The data default is the embedded Wikipedia passages.",
    ),
    "run": (
        "Run every stage of a multi-stage recipe in order (oneshot and finetune).",
        "Execute all stages in order: oneshot stages by layer-wise calibration, finetune stages "
        "by training. Stage S writes OUTPUT_DIR/S/, a complete checkpoint that the next stage "
        "loads; the last one is the final model. A distillation teacher 'stage:NAME' is that "
        "stage's output. With --from-manifest it runs again what an earlier output's manifest "
        "records.",
        None,
    ),
    "eval": (
        "Evaluate a saved model: perplexity, lm-eval tasks, math, MT-Bench answers.",
        "Evaluate a saved model exactly as saved (sparse and quantized checkpoints included): "
        "perplexity on a text file or the embedded held-out passages; lm-eval tasks through its "
        "Python API, including reciprune's local tasks on packaged data (no download); ASDiv "
        "math exact match and gold-answer likelihood; MT-Bench answer generation. Prints a "
        "table; --output writes JSON.",
        "Local tasks (packaged data, no download): piqa, siqa, openbookqa, commonsenseqa, boolq, "
        "mmlu, logiqa (multiple choice: acc, acc_norm), asdiv (generation exact_match + "
        "answer_nll), asdiv_nll (answer_nll only). A bare name means the local task; "
        "lm_eval:NAME forces lm-eval's registry task (e.g. lm_eval:piqa), and any other name "
        "(hellaswag, gsm8k, ...) is an lm-eval registry task, which needs network or a cache. "
        "Without --tasks or --mt-bench-questions, perplexity on the embedded passages is measured.",
    ),
    "compare": (
        "Print saved models side by side: manifests and evaluation results.",
        "Print a side-by-side table of model folders: model source, run type, recipe hash, "
        "sparsity, perplexity and loss metrics from reciprune_manifest.json, weight file size, "
        "and every task metric in eval_results.json (written by `reciprune eval "
        "--save-results`). A results JSON file from `reciprune eval --output` may be passed too.",
        None,
    ),
    "report": (
        "Print the per-layer table of a oneshot output and plot it.",
        "Print each compressed module's sparsity, N:M pattern and relative reconstruction error "
        "‖WX − W'X‖²/‖WX‖² on the calibration data, from the output's manifest, and write "
        "layer_report.png beside it.",
        None,
    ),
    "recipe": ("Work with recipes (check).", "Work with recipes (check).", None),
    "modifiers": (
        "List the available modifiers.",
        "List every registered modifier (built-in and from the 'reciprune.modifiers' "
        "entry-point group) with one line each.",
        None,
    ),
}
_RUN_HELP = {
    "output_dir": "Folder that receives one sub-folder per stage (re-running a oneshot or "
    "finetune manifest: the output folder itself, laid out as that command writes it).",
    "overwrite": "Replace existing stage outputs.",
    "resume": "Skip stages whose output is complete; resume a finetune stage from its checkpoint.",
    "dataset": "Data for every stage: calibration for oneshot stages, training for finetune "
    "stages unless their 'training:' names a dataset.",
}
_FROM_MANIFEST_HELP = (
    "Re-run what the reciprune_manifest.json of an earlier `oneshot`, `finetune` or `run` output "
    "(or its folder) records: the same recipe (its text in the manifest, or recipe.yaml beside "
    "it, checked against the recorded hash), model, data, calibration, training arguments, seed "
    "and evaluation options, into --output-dir. Stops before loading weights if the manifest "
    "lacks any of these or the model has changed since. Only --output-dir, --overwrite, "
    "--resume, --no-progress, --trust-remote-code and --allow-model-change may be given with it."
)


def _command(sub: Any, name: str) -> argparse.ArgumentParser:
    help_text, description, epilog = COMMAND_TEXTS[name]
    return sub.add_parser(name, help=help_text, description=description, epilog=epilog)


def _job_commands(sub: Any) -> None:
    """oneshot, finetune and run: a recipe, option groups, model, output and perplexity."""
    oneshot = _command(sub, "oneshot")
    _add_recipe_args(oneshot)
    add_options(oneshot, CalibrationOptions)
    _add_job_options(oneshot, output_help={}, skip_output=("resume",))

    finetune = _command(sub, "finetune")
    _add_recipe_args(finetune, required=False)
    _add_job_options(finetune, output_help={
        "output_dir": "Where to save the trained model.",
        "overwrite": "Replace an existing --output-dir and delete old checkpoints of it.",
    })  # fmt: skip
    add_options(finetune, LaunchOptions)
    add_options(finetune.add_argument_group(
        "training arguments (override the recipe stage's 'training:' values)"), TrainingConfig)  # fmt: skip

    run = _command(sub, "run")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help=_RECIPE_HELP)
    source.add_argument("--from-manifest", metavar="MANIFEST", help=_FROM_MANIFEST_HELP)
    _add_override_args(run)
    run.add_argument("--allow-model-change", action="store_true", help="With --from-manifest: "
                     "run even if the model (or teacher) no longer has the fingerprint the "
                     "manifest records (the result may then differ).")  # fmt: skip
    for options in (CalibrationOptions, RunOptions, LaunchOptions):
        add_options(run, options, help=_RUN_HELP)
    _add_job_options(run, output_help=_RUN_HELP)


def _other_commands(sub: Any) -> None:
    """eval, compare, report, recipe check, modifiers."""
    evaluate = _command(sub, "eval")
    add_options(evaluate, ModelOptions)
    add_options(evaluate, EvalOptions)
    compare = _command(sub, "compare")
    compare.add_argument("dirs", nargs="+", metavar="DIR",
                         help="Model folders (or eval results JSON files).")  # fmt: skip
    compare.add_argument("--markdown", action="store_true",
                         help="Print a Markdown table (e.g. for a README).")  # fmt: skip
    report = _command(sub, "report")
    report.add_argument("output_dir", help="A folder written by `reciprune oneshot`.")
    report.add_argument("--plot", help="Where to write the PNG (default: "
                        "OUTPUT_DIR/layer_report.png).")  # fmt: skip
    check = _command(sub, "recipe").add_subparsers(dest="recipe_command", metavar="ACTION").add_parser(
        "check",
        help="Validate a recipe and print its plan.",
        description="Validate a recipe (no weights are loaded) and print the plan: stages, "
        "modifiers, the modules each one targets on the model's config, parameters affected.",
    )
    _add_recipe_args(check, positional=True)
    add_options(check, ModelOptions)
    check.add_argument("--no-model", action="store_true",
                       help="Validate only; do not resolve targets on a model.")  # fmt: skip
    _command(sub, "modifiers").add_argument(
        "--markdown", metavar="DIR",
        help="Write one reference page per modifier into DIR (as in the repo's modifiers/).",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option carries its help text (from the options models)."""
    parser = argparse.ArgumentParser(
        prog="reciprune",
        description="Declarative recipes for pruning, quantizing and sparse fine-tuning LLMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"reciprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _job_commands(sub)
    _other_commands(sub)
    return parser


# --- from flags to jobs ---------------------------------------------------------------------------
def _load_recipe(args: argparse.Namespace):
    if args.recipe is None:  # `reciprune finetune` without a recipe: dense fine-tuning
        if args.overrides or args.stage:
            raise ReciPruneError("--set and --stage need a --recipe to apply to.")
        return Recipe(stages=[Stage(name="finetune_stage", run_type="finetune")])

    recipe = load_recipe(args.recipe, args.overrides)
    return recipe.select(args.stage) if args.stage else recipe


def _job(cls: type[Job], args: argparse.Namespace, **fields: Any) -> Job:
    """A job of kind `cls` from the flags given; `fields` supply what flags alone do not."""
    for group in (*cls.option_groups, "output"):
        if group not in fields:
            fields[group] = options_from(args, cls.model_fields[group].annotation)
    return cls(**fields)


def _training_config(stage, args: argparse.Namespace) -> TrainingConfig:
    """The stage's `training:` values, then every flag the user gave, validated."""
    values = stage.training.given() if stage.training else {}
    return validate_options(
        TrainingConfig,
        {**values, **given_flags(args, TrainingConfig)},
        fix="Fix the flag, or the value under the stage's 'training:' in the recipe.",
    )


def _finetune_stage(recipe):
    """The recipe's one stage (`_load_recipe` kept only the --stage given), a finetune stage."""
    if len(recipe.stages) > 1:
        raise ReciPruneError(
            f"this recipe has {len(recipe.stages)} stages ({', '.join(recipe.stage_names)}); "
            "`reciprune finetune` runs one: pass --stage NAME, or run them all with "
            "`reciprune run`."
        )
    if recipe.stages[0].run_type != "finetune":
        raise ReciPruneError(
            f"stage {recipe.stages[0].name!r} is a {recipe.stages[0].run_type} stage; "
            "`reciprune finetune` runs finetune stages (use `reciprune oneshot` for it)."
        )
    return recipe.stages[0]


def _print_metrics(folder: Path, metrics: dict[str, Any], keys: Sequence[str] | None = None) -> None:
    print(f"\nsaved to {folder}")
    for key, value in metrics.items():
        if isinstance(value, float) and (keys is None or key in keys):
            print(f"  {key:<18} {value:.4f}")


# --- commands -------------------------------------------------------------------------------------
def _cmd_oneshot(args: argparse.Namespace) -> int:
    from reciprune.pipelines.oneshot import run_oneshot_job

    job = _job(OneshotJob, args, recipe=_load_recipe(args))
    result = run_oneshot_job(job)
    _print_metrics(job.output.output_dir, result["metrics"],
                   ("ppl_dense", "ppl_compressed", "global_sparsity"))  # fmt: skip
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from reciprune.pipelines.finetune import accumulation_steps, check_4bit_base

    recipe = _load_recipe(args)
    stage = _finetune_stage(recipe)
    training = _training_config(stage, args)
    job = _job(FinetuneJob, args, recipe=recipe, training=training)
    nproc = options_from(args, LaunchOptions).nproc_per_node
    if nproc is not None:
        from reciprune.pipelines.launch import run_under_torchrun

        # A bad batch split or a 4-bit base on several processes fails before any starts.
        accumulation_steps(training, nproc)
        check_4bit_base(training, stage, nproc)
        code = run_under_torchrun(job, nproc)
        if code == 0:
            from reciprune.evaluation.report import read_manifest

            _print_metrics(job.output.output_dir, read_manifest(job.output.output_dir)["metrics"])
        return code
    from reciprune.pipelines.finetune_job import run_finetune_job

    result = run_finetune_job(job)
    if is_main_process():
        _print_metrics(job.output.output_dir, result["metrics"])
    return 0


def _recorded_flags(args: argparse.Namespace) -> list[str]:
    """Flags given beside --from-manifest whose values the manifest records."""
    given = ["--set"] * bool(args.overrides) + ["--stage"] * bool(args.stage)
    for cls in (ModelOptions, CalibrationOptions, PerplexityOptions, RunOptions, LaunchOptions):
        given += [flag_name(n) for n in given_flags(args, cls) if n != "trust_remote_code"]
    return given


def _cmd_rerun(args: argparse.Namespace) -> int:
    from reciprune.pipelines.rerun import compare_data, prepare_rerun, run_rerun

    given = _recorded_flags(args)
    if given:
        raise ReciPruneError(
            f"--from-manifest re-runs exactly what the manifest records, so {', '.join(given)} "
            "cannot be given with it. To change something, run the recipe.yaml beside the "
            "manifest with `reciprune run --recipe` and the options you want."
        )
    rerun = prepare_rerun(
        args.from_manifest,
        options_from(args, OutputOptions),
        allow_model_change=args.allow_model_change,
        trust_remote_code=options_from(args, ModelOptions).trust_remote_code,
    )
    print(f"re-running the {rerun.job.kind} recorded in {rerun.manifest_path}")
    _print_ppl_windows(rerun.job)
    run_rerun(rerun)
    from reciprune.evaluation.compare import SUMMARY_METRICS
    from reciprune.evaluation.report import read_manifest

    output = Path(rerun.job.output.output_dir)
    manifest = read_manifest(output)
    differ = compare_data(rerun, manifest)
    if differ:
        print(
            f"note: the data read now has another fingerprint than recorded ({', '.join(differ)}): "
            "the data set or its cache changed, so the result may differ."
        )
    if rerun.job.kind == "run":
        _print_run_summary(output, manifest)
    else:
        _print_metrics(output, manifest["metrics"], SUMMARY_METRICS)
    return 0


def _print_ppl_windows(job: Job) -> None:
    """Say which perplexity windows every stage measures, so numbers of stages are comparable."""
    options = job.evaluation
    if options.eval_ppl:
        print(f"perplexity: {options.ppl_samples} windows of {options.ppl_seq_length} tokens "
              "(--ppl-samples, --ppl-seq-length), the same in every stage")  # fmt: skip


def _print_run_summary(output_dir: Path, manifest: dict[str, Any]) -> None:
    from reciprune.evaluation.compare import run_summary

    print(f"\nrun finished: {output_dir} (final model: {output_dir / manifest['final']})")
    print(run_summary(manifest))


def _cmd_run(args: argparse.Namespace) -> int:
    if args.from_manifest is not None:
        return _cmd_rerun(args)
    from reciprune.evaluation.compare import SUMMARY_METRICS
    from reciprune.evaluation.report import read_manifest
    from reciprune.pipelines.multistage import run_stages

    job = _job(RunJob, args, recipe=_load_recipe(args))
    _print_ppl_windows(job)
    for stage, folder in run_stages(job):  # a recipe has at least one stage
        manifest = read_manifest(folder)
        print(f"\nstage {stage} ({manifest.get('run_type')}) done")
        _print_metrics(folder, manifest.get("metrics") or {}, SUMMARY_METRICS)
    _print_run_summary(folder.parent, read_manifest(folder.parent))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from reciprune.evaluation.harness import evaluate_model, merge_into_model_dir, results_table
    from reciprune.evaluation.harness import write_json as write_results

    model = options_from(args, ModelOptions)
    options = options_from(args, EvalOptions)
    if options.save_results and not (model.model and Path(model.model).is_dir()):
        raise ReciPruneError(
            "--save-results writes MODEL/eval_results.json, so --model must be a local model "
            "folder; use --output FILE for other models."
        )
    ppl = options.ppl
    if ppl is None and not options.tasks and not options.mt_bench_questions:
        ppl = "embedded"  # `reciprune eval --model M` alone measures perplexity, as it always did
    report = evaluate_model(
        model.model,
        **options.model_dump(exclude={"ppl", "tasks", "output", "save_results"}),
        tasks=options.tasks or (),
        ppl=ppl,
        trust_remote_code=model.trust_remote_code,
    )
    if "perplexity" in report["results"]:
        measured = report["results"]["perplexity"]
        print(f"perplexity ({ppl}): {measured['ppl']:.4f} over {measured['num_tokens']} tokens")
    if report["results"]:
        print(results_table(report))
    if "mt_bench" in report:
        answers = report["mt_bench"]
        print(f"MT-Bench answers ({answers['num_questions']} questions): {answers['answers']}")
    if options.output:
        print(f"results: {write_results(report, options.output)}")
    if options.save_results:
        print(f"results merged into {merge_into_model_dir(report, model.model)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from reciprune.evaluation.compare import compare_table

    print(compare_table(args.dirs, markdown=args.markdown))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from reciprune.evaluation.report import PLOT_NAME, plot_report, read_manifest, report_table

    manifest = read_manifest(Path(args.output_dir))
    print(report_table(manifest))
    plot = plot_report(manifest, Path(args.plot or Path(args.output_dir) / PLOT_NAME))
    print(f"\nplot: {plot}")
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    if args.recipe_command != "check":
        build_parser().parse_args(["recipe", "--help"])
        return 2
    recipe = _load_recipe(args)
    config = None
    if not args.no_model:
        from reciprune.models import load_config

        config = load_config(options_from(args, ModelOptions).model)
    print(describe_plan(recipe, config))
    return 0


def _cmd_modifiers(args: argparse.Namespace) -> int:
    if args.markdown:
        from reciprune.modifiers.docs import write_reference_pages

        for path in write_reference_pages(Path(args.markdown)):
            print(path)
        return 0
    registry = available_modifiers()
    width = max(len(n) for n in registry)
    for name, cls in registry.items():
        print(f"{name:<{width}}  {cls.summary()}")
    return 0


COMMANDS = {
    "oneshot": _cmd_oneshot,
    "finetune": _cmd_finetune,
    "run": _cmd_run,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
    "report": _cmd_report,
    "recipe": _cmd_recipe,
    "modifiers": _cmd_modifiers,
}


#: Commands that load models (and so may draw the libraries' progress bars).
_MODEL_COMMANDS = ("oneshot", "finetune", "run", "eval")


def _interrupted(output_dir: str | None, had_output: bool) -> str:
    """The one line Ctrl-C prints: outputs are renamed into place only when complete, so nothing
    new is there; fine-tuning's resumable checkpoints (beside the output) are kept on purpose."""
    kept = "; previous output kept" if had_output else ""
    line = f"interrupted; nothing was written{kept}"
    if output_dir is not None:
        from reciprune.pipelines.finetune import checkpoint_root

        checkpoints = checkpoint_root(Path(output_dir).expanduser().absolute())
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            line += f"; training checkpoints in {checkpoints} kept: rerun with --resume to continue"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `reciprune` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import (through peft/transformers) that an optional speed-up kernel
    # package is missing, on every command; its CPU 4-bit path works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if args.command in _MODEL_COMMANDS and not bars_wanted(getattr(args, "progress", True)):
        quiet_library_bars()
    output_dir = getattr(args, "output_dir", None)
    had_output = output_dir is not None and Path(output_dir).is_dir() and any(Path(output_dir).iterdir())
    try:
        writes = output_dir is not None and args.command in ("oneshot", "finetune", "run")
        with output_lock(output_dir) if writes else contextlib.nullcontext():
            return COMMANDS[args.command](args)
    except ReciPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(output_dir, had_output), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
