"""`reciprune` command line: oneshot compression, evaluation, recipe checks, modifier listing."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from reciprune import __version__
from reciprune.errors import ReciPruneError

EPILOG = """examples:
  reciprune oneshot --recipe recipes/quickstart/sparsegpt_50.yaml --output-dir out/sgpt50
  reciprune finetune --recipe recipes/quickstart/sparse_finetune_distill.yaml \
      --model out/sgpt50 --distill-teacher embedded:smollm2-135m-instruct --output-dir out/ft
  reciprune run --recipe recipes/sparse_llama2_7b_gsm8k/smollm2_asdiv.yaml --output-dir out/run
  reciprune recipe check recipes/quickstart/sparsegpt_50.yaml
  reciprune eval --model out/sgpt50 --ppl
  reciprune eval --model out/sgpt50 --tasks piqa,boolq,asdiv --limit 200 --save-results
  reciprune compare out/dense out/sgpt50
  reciprune modifiers
Without --model and --dataset, the embedded SmolLM2-135M-Instruct model and the embedded
Wikipedia passages (BoolQ) are used, so every command works offline."""


def _add_recipe_args(
    parser: argparse.ArgumentParser, positional: bool = False, required: bool = True
) -> None:
    if positional:
        parser.add_argument("recipe", help="Recipe YAML file (SparseML or explicit form).")
    elif required:
        parser.add_argument(
            "--recipe", required=True, help="Recipe YAML file (SparseML or explicit form)."
        )
    else:
        parser.add_argument(
            "--recipe",
            default=None,
            help="Recipe YAML file (SparseML or explicit form). Without one the model is "
            "fine-tuned dense, with no modifier.",
        )
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


def _add_model_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--model",
        required=required,
        default=None,
        help="Local Hugging Face folder, .gguf file, or hub id (default: the embedded "
        "SmolLM2-135M-Instruct).",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow model code from the model folder / hub to run (off by default).",
    )


def _training_flag_kwargs(name: str, info) -> dict:
    """argparse keyword arguments for one TrainingConfig field (default None: recipe wins)."""
    import typing

    annotation = info.annotation
    args = typing.get_args(annotation)
    kwargs: dict = {"default": None, "help": info.description}
    default = info.default
    if default is not None:
        kwargs["help"] += f" (default: {default})"
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        return kwargs
    if typing.get_origin(annotation) is typing.Literal:
        kwargs["choices"] = list(args)
        return kwargs
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    kwargs["type"] = base if base in (int, float, str) else str
    kwargs["metavar"] = {int: "N", float: "X", str: "VALUE"}.get(base, "VALUE")
    return kwargs


def _add_training_args(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per training argument; a flag given overrides the recipe stage's `training:`."""
    from reciprune.recipe.training import TrainingConfig

    group = parser.add_argument_group(
        "training arguments (override the recipe stage's 'training:' values)"
    )
    for name, info in TrainingConfig.model_fields.items():
        if name in skip:
            continue
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, **_training_flag_kwargs(name, info))


def _add_launch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="Start N training processes on this machine with torchrun (FSDP2: one GPU each on "
        "CUDA, gloo on CPU). For several machines run `torchrun ... -m reciprune finetune ...` "
        "yourself instead.",
    )


def _add_ppl_args(parser: argparse.ArgumentParser, window: str = "512") -> None:
    parser.add_argument(
        "--eval-ppl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Measure perplexity on held-out text before and after (default on).",
    )
    parser.add_argument(
        "--ppl-file",
        default=None,
        help="Held-out text for perplexity (.txt/.jsonl/.json/.parquet); default: embedded "
        "held-out passages, disjoint from the calibration text.",
    )
    parser.add_argument(
        "--ppl-samples",
        type=int,
        default=16,
        help=f"Windows of {window} tokens scored for perplexity (default 16).",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option carries its help text."""
    parser = argparse.ArgumentParser(
        prog="reciprune",
        description="Declarative recipes for pruning, quantizing and sparse fine-tuning LLMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"reciprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    oneshot = sub.add_parser(
        "oneshot",
        help="Prune/compress a model layer by layer on calibration data and save it.",
        description="Apply a recipe's oneshot stages layer by layer on calibration data, print "
        "dense vs compressed perplexity, and save a Hugging Face checkpoint with recipe.yaml and "
        "reciprune_manifest.json.",
    )
    _add_recipe_args(oneshot)
    _add_model_args(oneshot)
    oneshot.add_argument(
        "--dataset",
        default="embedded",
        help="Calibration data: 'embedded' (default, packaged Wikipedia passages), a registry "
        "name (wikitext, c4, gsm8k, open_platypus, ultrachat; needs network or cache), a local "
        ".txt/.jsonl/.json/.parquet file, or a saved datasets folder.",
    )
    oneshot.add_argument("--output-dir", required=True, help="Where to save the checkpoint.")
    oneshot.add_argument(
        "--num-calibration-samples", type=int, default=64, help="Calibration sequences (default 64)."
    )
    oneshot.add_argument(
        "--max-seq-length", type=int, default=512, help="Tokens per sequence (default 512)."
    )
    oneshot.add_argument(
        "--calibration-batch-size",
        type=int,
        default=8,
        help="Sequences per calibration forward (default 8): memory vs speed.",
    )
    oneshot.add_argument("--seed", type=int, default=42, help="Seed for data sampling (default 42).")
    _add_ppl_args(oneshot, window="--max-seq-length")
    oneshot.add_argument(
        "--overwrite", action="store_true", help="Replace an existing --output-dir."
    )
    oneshot.add_argument(
        "--no-progress", action="store_true", help="Hide progress bars (e.g. in CI logs)."
    )

    finetune = sub.add_parser(
        "finetune",
        help="Fine-tune a model with a recipe's finetune stage (FSDP2 under torchrun).",
        description="Train a model while the stage's modifiers keep masks, distill from a "
        "teacher or choose which parameters learn. One process runs as is; --nproc-per-node N "
        "(or torchrun) shards the model with FSDP2. Saves a Hugging Face checkpoint with "
        "recipe.yaml, reciprune_manifest.json (with the loss curve) and loss_curve.png; with "
        "--save-steps, resumable checkpoints go to OUTPUT_DIR.checkpoints/ until the end.",
        epilog="Training arguments come from the stage's 'training:' mapping in the recipe, then "
        "these flags. The data default is the embedded Wikipedia passages.",
    )
    _add_recipe_args(finetune, required=False)
    _add_model_args(finetune)
    finetune.add_argument("--output-dir", required=True, help="Where to save the trained model.")
    _add_training_args(finetune)
    _add_launch_args(finetune)
    finetune.add_argument(
        "--resume",
        action="store_true",
        help="Continue from the newest checkpoint in OUTPUT_DIR.checkpoints/ (same number of "
        "processes and training arguments).",
    )
    finetune.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --output-dir and delete old checkpoints of it.",
    )
    _add_ppl_args(finetune)
    finetune.add_argument(
        "--no-progress", action="store_true", help="Hide progress bars (e.g. in CI logs)."
    )

    run = sub.add_parser(
        "run",
        help="Run every stage of a multi-stage recipe in order (oneshot and finetune).",
        description="Execute all stages in order: oneshot stages by layer-wise calibration, "
        "finetune stages by training. Stage S writes OUTPUT_DIR/S/, a complete checkpoint that "
        "the next stage loads; the last one is the final model. A distillation teacher "
        "'stage:NAME' is that stage's output. With --from-manifest it runs again what an "
        "earlier output's manifest records.",
    )
    run_source = run.add_mutually_exclusive_group(required=True)
    run_source.add_argument("--recipe", help="Recipe YAML file (SparseML or explicit form).")
    run_source.add_argument(
        "--from-manifest",
        default=None,
        metavar="MANIFEST",
        help="Re-run what the reciprune_manifest.json of an earlier `oneshot`, `finetune` or "
        "`run` output (or its folder) records: the same recipe (its text in the manifest, or "
        "recipe.yaml beside it, checked against the recorded hash), model, data, calibration, "
        "training arguments, seed and evaluation options, into --output-dir. Stops before "
        "loading weights if the manifest lacks any of these or the model has changed since. "
        "Only --output-dir, --overwrite, --resume, --no-progress, --trust-remote-code and "
        "--allow-model-change may be given with it.",
    )
    _add_override_args(run)
    _add_model_args(run)
    run.add_argument(
        "--allow-model-change",
        action="store_true",
        help="With --from-manifest: run even if the model (or teacher) no longer has the "
        "fingerprint the manifest records (the result may then differ).",
    )
    run.add_argument(
        "--output-dir",
        required=True,
        help="Folder that receives one sub-folder per stage (re-running a oneshot or finetune "
        "manifest: the output folder itself, laid out as that command writes it).",
    )
    run.add_argument(
        "--dataset",
        default=None,
        help="Data for every stage: calibration for oneshot stages, training for finetune "
        "stages unless their 'training:' names a dataset (default: embedded passages).",
    )
    run.add_argument(
        "--num-calibration-samples", type=int, default=64, help="Calibration sequences (default 64)."
    )
    run.add_argument(
        "--calibration-seq-length",
        type=int,
        default=512,
        help="Tokens per calibration sequence (default 512).",
    )
    run.add_argument(
        "--calibration-batch-size", type=int, default=8, help="Sequences per calibration forward."
    )
    run.add_argument("--seed", type=int, default=42, help="Seed for calibration data (default 42).")
    run.add_argument(
        "--distill-teacher",
        default=None,
        help="Teacher for finetune stages that distill (PATH, self, base, or stage:NAME); overrides "
        "the stages' 'training: distill_teacher'.",
    )
    _add_launch_args(run)
    run.add_argument(
        "--resume",
        action="store_true",
        help="Skip stages whose output is complete; resume a finetune stage from its checkpoint.",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="Replace existing stage outputs."
    )
    _add_ppl_args(run)
    run.add_argument(
        "--no-progress", action="store_true", help="Hide progress bars (e.g. in CI logs)."
    )

    evaluate = sub.add_parser(
        "eval",
        help="Evaluate a saved model: perplexity, lm-eval tasks, math, MT-Bench answers.",
        description="Evaluate a saved model exactly as saved (sparse and quantized checkpoints "
        "included): perplexity on a text file or the embedded held-out passages; lm-eval tasks "
        "through its Python API, including reciprune's local tasks on packaged data (no "
        "download); ASDiv math exact match and gold-answer likelihood; MT-Bench answer "
        "generation. Prints a table; --output writes JSON.",
        epilog="Local tasks (packaged data, no download): piqa, siqa, openbookqa, commonsenseqa, "
        "boolq, mmlu, logiqa (multiple choice: acc, acc_norm), asdiv (generation exact_match + "
        "answer_nll), asdiv_nll (answer_nll only). A bare name means the local task; "
        "lm_eval:NAME forces lm-eval's registry task (e.g. lm_eval:piqa), and any other name "
        "(hellaswag, gsm8k, ...) is an lm-eval registry task, which needs network or a cache. "
        "Without --tasks or --mt-bench-questions, perplexity on the embedded passages is measured.",
    )
    _add_model_args(evaluate)
    evaluate.add_argument(
        "--ppl",
        nargs="?",
        const="embedded",
        default=None,
        metavar="FILE",
        help="Perplexity on FILE (.txt/.jsonl/.json/.parquet), or on the embedded held-out "
        "passages when no FILE is given (the default when no --tasks or --mt-bench-questions).",
    )
    evaluate.add_argument(
        "--max-seq-length", type=int, default=512, help="Window length in tokens (default 512)."
    )
    evaluate.add_argument(
        "--ppl-samples", type=int, default=16, help="Windows scored (default 16)."
    )
    evaluate.add_argument(
        "--tasks",
        default=None,
        metavar="LIST",
        help="Comma-separated tasks, e.g. piqa,siqa,openbookqa,boolq,asdiv (local, no download) "
        "or lm-eval registry names (lm_eval:piqa, hellaswag, ...). See the list below.",
    )
    evaluate.add_argument(
        "--limit",
        type=float,
        default=None,
        metavar="N",
        help="Evaluate only the first N documents of each task (a value below 1: that "
        "fraction); also caps the MT-Bench questions. Default: all.",
    )
    evaluate.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        metavar="K",
        help="Examples in each prompt (default: 0 for local tasks, the task's own default for "
        "registry tasks). Local examples come from a part of the data that is never scored.",
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=8, help="Sequences per forward pass (default 8)."
    )
    evaluate.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="Most tokens generated per answer (default: 128 for asdiv, 512 for MT-Bench).",
    )
    evaluate.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="Format lm-eval task prompts with the tokenizer's chat template (off by default, "
        "as lm-eval).",
    )
    evaluate.add_argument(
        "--mt-bench-questions",
        default=None,
        metavar="FILE",
        help="Answer the questions of this FastChat-format JSONL file ({question_id, category, "
        "turns}) turn by turn with the chat template, greedily.",
    )
    evaluate.add_argument(
        "--mt-bench-answers",
        default=None,
        metavar="FILE",
        help="Where to write the MT-Bench answers JSONL (FastChat judge format; default "
        "model_answer/MODEL_ID.jsonl).",
    )
    evaluate.add_argument(
        "--model-id",
        default=None,
        help="Name of the model in MT-Bench answers (default: the model folder's name).",
    )
    evaluate.add_argument(
        "--seed", type=int, default=1234, help="Seed for few-shot sampling (default 1234)."
    )
    evaluate.add_argument("--output", default=None, help="Also write the results to this JSON file.")
    evaluate.add_argument(
        "--save-results",
        action="store_true",
        help="Also merge the results into MODEL/eval_results.json (a local model folder), where "
        "`reciprune compare` finds them; tasks evaluated again replace their old entry.",
    )
    evaluate.add_argument(
        "--no-progress",
        action="store_true",
        help="Hide reciprune's progress bars (e.g. in CI logs); lm-eval still prints its own.",
    )

    compare = sub.add_parser(
        "compare",
        help="Print saved models side by side: manifests and evaluation results.",
        description="Print a side-by-side table of model folders: model source, run type, recipe "
        "hash, sparsity, perplexity and loss metrics from reciprune_manifest.json, weight file "
        "size, and every task metric in eval_results.json (written by `reciprune eval "
        "--save-results`). A results JSON file from `reciprune eval --output` may be passed too.",
    )
    compare.add_argument(
        "dirs", nargs="+", metavar="DIR", help="Model folders (or eval results JSON files)."
    )
    compare.add_argument(
        "--markdown", action="store_true", help="Print a Markdown table (e.g. for a README)."
    )

    report = sub.add_parser(
        "report",
        help="Print the per-layer table of a oneshot output and plot it.",
        description="Print each compressed module's sparsity, N:M pattern and relative "
        "reconstruction error ‖WX − W'X‖²/‖WX‖² on the calibration data, from the output's "
        "manifest, and write layer_report.png beside it.",
    )
    report.add_argument("output_dir", help="A folder written by `reciprune oneshot`.")
    report.add_argument(
        "--plot",
        default=None,
        help="Where to write the PNG (default: OUTPUT_DIR/layer_report.png).",
    )

    recipe = sub.add_parser("recipe", help="Work with recipes (check).")
    recipe_sub = recipe.add_subparsers(dest="recipe_command", metavar="ACTION")
    check = recipe_sub.add_parser(
        "check",
        help="Validate a recipe and print its plan.",
        description="Validate a recipe (no weights are loaded) and print the plan: stages, "
        "modifiers, the modules each one targets on the model's config, parameters affected.",
    )
    _add_recipe_args(check, positional=True)
    _add_model_args(check)
    check.add_argument(
        "--no-model", action="store_true", help="Validate only; do not resolve targets on a model."
    )

    mods = sub.add_parser(
        "modifiers",
        help="List the available modifiers.",
        description="List every registered modifier (built-in and from the 'reciprune.modifiers' "
        "entry-point group) with one line each.",
    )
    mods.add_argument(
        "--markdown",
        default=None,
        metavar="DIR",
        help="Write one reference page per modifier into DIR (as in the repo's modifiers/).",
    )
    return parser


def _load_recipe(args: argparse.Namespace):
    from reciprune.recipe import load_recipe

    if args.recipe is None:  # `reciprune finetune` without a recipe: dense fine-tuning
        from reciprune.recipe import Recipe
        from reciprune.recipe.schema import Stage

        if args.overrides or args.stage:
            raise ReciPruneError("--set and --stage need a --recipe to apply to.")
        return Recipe(stages=[Stage(name="finetune_stage", run_type="finetune")])

    recipe = load_recipe(args.recipe, args.overrides)
    return recipe.select(args.stage) if args.stage else recipe


def _cmd_oneshot(args: argparse.Namespace) -> int:
    from reciprune.pipelines.jobs import OneshotJob, run_oneshot_job

    for flag in ("num_calibration_samples", "max_seq_length", "calibration_batch_size", "ppl_samples"):
        if getattr(args, flag) <= 0:
            raise ReciPruneError(f"--{flag.replace('_', '-')} must be a positive integer")
    recipe = _load_recipe(args)
    job = OneshotJob(
        recipe=recipe,
        output_dir=Path(args.output_dir),
        model=args.model,
        dataset=args.dataset,
        num_calibration_samples=args.num_calibration_samples,
        max_seq_length=args.max_seq_length,
        calibration_batch_size=args.calibration_batch_size,
        seed=args.seed,
        eval_ppl=args.eval_ppl,
        ppl_file=args.ppl_file,
        ppl_samples=args.ppl_samples,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    result = run_oneshot_job(job)
    metrics = result["metrics"]
    print(f"\nsaved to {job.output_dir}")
    for key in ("ppl_dense", "ppl_compressed", "global_sparsity"):
        if key in metrics:
            print(f"  {key:<16} {metrics[key]:.4f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from reciprune.evaluation.harness import evaluate_model, merge_into_model_dir, results_table
    from reciprune.evaluation.harness import write_json as write_results

    for flag in ("max_seq_length", "ppl_samples", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ReciPruneError(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.save_results and not (args.model and Path(args.model).is_dir()):
        raise ReciPruneError(
            "--save-results writes MODEL/eval_results.json, so --model must be a local model "
            "folder; use --output FILE for other models."
        )
    ppl = args.ppl
    if ppl is None and not args.tasks and not args.mt_bench_questions:
        ppl = "embedded"  # `reciprune eval --model M` alone measures perplexity, as it always did
    report = evaluate_model(
        args.model,
        tasks=args.tasks or (),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        apply_chat_template=args.apply_chat_template,
        ppl=ppl,
        ppl_samples=args.ppl_samples,
        max_seq_length=args.max_seq_length,
        seed=args.seed,
        mt_bench_questions=args.mt_bench_questions,
        mt_bench_answers=args.mt_bench_answers,
        model_id=args.model_id,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    if "perplexity" in report["results"]:
        measured = report["results"]["perplexity"]
        print(f"perplexity ({ppl}): {measured['ppl']:.4f} over {measured['num_tokens']} tokens")
    if report["results"]:
        print(results_table(report))
    if "mt_bench" in report:
        answers = report["mt_bench"]
        print(f"MT-Bench answers ({answers['num_questions']} questions): {answers['answers']}")
    if args.output:
        print(f"results: {write_results(report, args.output)}")
    if args.save_results:
        print(f"results merged into {merge_into_model_dir(report, args.model)}")
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
    from reciprune.recipe import describe_plan

    recipe = _load_recipe(args)
    config = None
    if not args.no_model:
        from reciprune.models import load_config

        config = load_config(args.model)
    print(describe_plan(recipe, config))
    return 0


def _cmd_modifiers(args: argparse.Namespace) -> int:
    from reciprune.modifiers import available_modifiers

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


def _torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine."""
    import subprocess

    from reciprune.core.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ReciPruneError(
            "--nproc-per-node is for starting torchrun; this process already runs under torchrun. "
            "Drop --nproc-per-node (torchrun's own --nproc-per-node sets the processes)."
        )
    if nproc < 1:
        raise ReciPruneError("--nproc-per-node must be at least 1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "reciprune", *argv,
    ]
    return subprocess.call(command)


def _strip_flag(argv: Sequence[str], flag: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == flag:
            skip = True
            continue
        if item.startswith(flag + "="):
            continue
        out.append(item)
    return out


def _training_config(stage, args: argparse.Namespace):
    """The stage's `training:` values, then every flag the user gave, validated."""
    from pydantic import ValidationError

    from reciprune.recipe.training import TrainingConfig

    values = stage.training.model_dump(exclude_unset=True) if stage.training else {}
    for name in TrainingConfig.model_fields:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    try:
        return TrainingConfig.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        field = TrainingConfig.model_fields.get(name)
        what = f" ({field.description.rstrip('.')})" if field and field.description else ""
        raise ReciPruneError(
            f"--{name.replace('_', '-')}{what}: {message}. Fix the flag, or the value under the "
            f"stage's 'training:' in the recipe."
        ) from None


def _finetune_stage(recipe, stage_name: str | None):
    stages = [s for s in recipe.stages if s.run_type == "finetune"]
    if stage_name is None and len(recipe.stages) > 1:
        raise ReciPruneError(
            f"this recipe has {len(recipe.stages)} stages ({', '.join(recipe.stage_names)}); "
            "`reciprune finetune` runs one: pass --stage NAME, or run them all with "
            "`reciprune run`."
        )
    if not stages:
        raise ReciPruneError(
            f"stage {recipe.stages[0].name!r} is a {recipe.stages[0].run_type} stage; "
            "`reciprune finetune` runs finetune stages (use `reciprune oneshot` for it)."
        )
    return stages[0]


def _cmd_finetune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.nproc_per_node is not None:
        # A bad recipe, flag or batch split fails here, before any process starts.
        from reciprune.pipelines.finetune import accumulation_steps, check_4bit_base

        stage = _finetune_stage(_load_recipe(args), args.stage)
        config = _training_config(stage, args)
        accumulation_steps(config, args.nproc_per_node)
        check_4bit_base(config, stage, args.nproc_per_node)
        return _torchrun(args.nproc_per_node, _strip_flag(argv, "--nproc-per-node"))
    from reciprune.pipelines.jobs import FinetuneJob, run_finetune_job

    recipe = _load_recipe(args)
    stage = _finetune_stage(recipe, args.stage)
    training = _training_config(stage, args)
    job = FinetuneJob(
        stage=stage,
        recipe_yaml=recipe.select(stage.name).to_yaml(),
        training=training,
        output_dir=Path(args.output_dir),
        model=args.model,
        resume=args.resume,
        overwrite=args.overwrite,
        eval_ppl=args.eval_ppl,
        ppl_file=args.ppl_file,
        ppl_samples=args.ppl_samples,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    result = run_finetune_job(job)
    from reciprune.core.distributed import is_main_process

    if is_main_process():
        print(f"\nsaved to {job.output_dir}")
        for key, value in result["metrics"].items():
            if isinstance(value, float):
                print(f"  {key:<18} {value:.4f}")
    return 0


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from reciprune.pipelines.multistage import RunJob, run_stages

    if args.from_manifest is not None:
        from reciprune.pipelines.rerun import run_from_manifest

        return run_from_manifest(args, argv, torchrun=_torchrun)
    recipe = _load_recipe(args)
    job = RunJob(
        recipe=recipe,
        output_dir=Path(args.output_dir),
        model=args.model,
        dataset=args.dataset,
        num_calibration_samples=args.num_calibration_samples,
        calibration_seq_length=args.calibration_seq_length,
        calibration_batch_size=args.calibration_batch_size,
        seed=args.seed,
        distill_teacher=args.distill_teacher,
        nproc_per_node=args.nproc_per_node,
        resume=args.resume,
        overwrite=args.overwrite,
        eval_ppl=args.eval_ppl,
        ppl_file=args.ppl_file,
        ppl_samples=args.ppl_samples,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    for stage, folder in run_stages(job):
        print(f"stage {stage}: {folder}")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in ("finetune", "run"):
            return COMMANDS[args.command](args, argv)
        return COMMANDS[args.command](args)
    except ReciPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
