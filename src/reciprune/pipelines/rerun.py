"""`reciprune run --from-manifest M`: run again what a manifest records, into a new folder.

A manifest of `reciprune oneshot`, `reciprune finetune` or `reciprune run` holds the recipe that
was applied (its text, checked against `recipe_sha256`; or `recipe.yaml` beside it), the job's
options (`invocation`: model, data, calibration, seed, evaluation; for finetune the resolved
training arguments under `training`) and the fingerprints of the model (and teacher) it started
from. Each kind is re-run by the same job that wrote it, so a oneshot manifest gives a oneshot
output folder and a run manifest a run folder. Everything is checked before any weights load.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from reciprune.errors import RecipeError, ReciPruneError
from reciprune.export.manifest import sha256_text
from reciprune.export.save import MANIFEST_FILE
from reciprune.models import DEFAULT_MODEL, ModelSource, resolve_model
from reciprune.recipe import Recipe, load_recipe
from reciprune.recipe.training import TrainingConfig

RUN_TYPES = ("oneshot", "finetune", "run")


@dataclass
class Rerun:
    """What a manifest asks to run again, ready to start (see `prepare_rerun`)."""

    run_type: str
    job: Any  # OneshotJob, FinetuneJob or RunJob
    manifest: dict[str, Any]
    manifest_path: Path
    world_size: int = 1


def load_manifest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The manifest at `path` (a reciprune_manifest.json, or the folder holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise ReciPruneError(
            f"--from-manifest {path}: no such file. Pass the reciprune_manifest.json of an output "
            "folder (or the folder itself)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReciPruneError(
            f"--from-manifest {path}: not a readable JSON manifest ({exc}). Pass the "
            "reciprune_manifest.json written by reciprune."
        ) from None
    if not isinstance(manifest, dict) or "manifest_version" not in manifest:
        raise ReciPruneError(
            f"--from-manifest {path}: this JSON file is not a reciprune manifest (it has no "
            "manifest_version). Pass the reciprune_manifest.json of a reciprune output folder."
        )
    return manifest, path


def _missing(path: Path, what: str) -> ReciPruneError:
    return ReciPruneError(
        f"--from-manifest {path}: the manifest does not record {what}, so the run cannot be "
        "repeated from it (it was written by an older reciprune, or edited). Run it again by "
        "hand: `reciprune run --recipe` with the recipe.yaml beside it and the options its "
        "manifest lists."
    )


def manifest_recipe(manifest: dict[str, Any], path: Path) -> Recipe:
    """The recipe the manifest's output applied: its stored text when that matches
    `recipe_sha256`, else `recipe.yaml` beside the manifest when that matches."""
    expected = manifest.get("recipe_sha256")
    if not expected:
        raise _missing(path, "the recipe's hash (recipe_sha256)")
    stored = manifest.get("recipe")
    if isinstance(stored, str) and sha256_text(stored) == expected:
        return _explicit_recipe(stored)
    beside = path.parent / "recipe.yaml"
    if beside.is_file() and sha256_text(beside.read_text(encoding="utf-8")) == expected:
        return _explicit_recipe(beside.read_text(encoding="utf-8"))
    raise ReciPruneError(
        f"--from-manifest {path}: neither the recipe stored in the manifest nor {beside} has the "
        f"recorded hash {expected[:12]}…, so the recipe that was applied is not available (it "
        "was changed or removed). Restore the original recipe.yaml beside the manifest."
    )


def _explicit_recipe(text: str) -> Recipe:
    """A recipe reciprune saved (`Recipe.to_yaml`, the explicit form). The user-facing parser
    rejects a stage with `modifiers: []`, which is how a dense finetune stage is saved, so that
    form is validated directly."""
    try:
        return load_recipe(text)
    except RecipeError:
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or "stages" not in data:
            raise
        try:
            return Recipe.model_validate(data)
        except ValueError:
            raise RecipeError(f"the recorded recipe does not validate: {text[:200]}") from None


def check_source(
    recorded: dict[str, Any] | None, what: str, path: Path, *, allow_changed: bool
) -> str | None:
    """The spec to load for a recorded model source, after checking that it still resolves and
    has the recorded fingerprint (unless `allow_changed`). None for the embedded default."""
    if not recorded or "fingerprint" not in recorded:
        raise _missing(path, f"the {what} and its fingerprint")
    spec, where = recorded.get("spec"), recorded.get("path")
    # A local path recorded relative to the first run's working folder: prefer the absolute one.
    candidates = [spec]
    if where and where != spec and Path(where).exists():
        candidates.insert(0, where)
    source: ModelSource | None = None
    error: Exception | None = None
    for candidate in candidates:
        try:
            source = resolve_model(candidate)
            break
        except ReciPruneError as exc:
            error = exc
    if source is None:
        raise ReciPruneError(
            f"--from-manifest {path}: the {what} it started from ({spec}) cannot be found now: "
            f"{error}"
        )
    if source.fingerprint != recorded["fingerprint"] and not allow_changed:
        raise ReciPruneError(
            f"--from-manifest {path}: the {what} {spec!r} has changed since the recorded run "
            f"(fingerprint {source.fingerprint[:12]}… now, {str(recorded['fingerprint'])[:12]}… "
            "recorded), so the result would differ. Restore that model, or pass "
            "--allow-model-change to run on the model as it is now."
        )
    return None if source.spec == DEFAULT_MODEL else source.spec


def _options(cls: type, invocation: dict[str, Any], path: Path) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(invocation) - names - {"world_size"})
    if unknown:
        raise ReciPruneError(
            f"--from-manifest {path}: the manifest records options this reciprune does not know "
            f"({', '.join(unknown)}); it was written by another version. Re-run it with that "
            "version, or by hand with `reciprune run --recipe`."
        )
    return {k: v for k, v in invocation.items() if k in names}


def prepare_rerun(
    manifest_path: str | Path,
    output_dir: Path,
    *,
    allow_model_change: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Rerun:
    """Rebuild the job a manifest records, with `output_dir` as its output; every check (recipe
    hash, options, model and teacher fingerprints, trust_remote_code) runs here, before any
    weights load."""
    from reciprune.pipelines.jobs import FinetuneJob, OneshotJob
    from reciprune.pipelines.multistage import RunJob

    manifest, path = load_manifest(manifest_path)
    run_type = manifest.get("run_type")
    if run_type not in RUN_TYPES:
        raise _missing(path, "which command wrote it (run_type)")
    invocation = manifest.get("invocation")
    if not isinstance(invocation, dict):
        raise _missing(path, "the options it ran with (invocation)")
    if invocation.get("trust_remote_code") and not trust_remote_code:
        raise ReciPruneError(
            f"--from-manifest {path}: the recorded run allowed the model's own code to run "
            "(--trust-remote-code). Pass --trust-remote-code again if you still trust it."
        )
    recipe = manifest_recipe(manifest, path)
    model = check_source(
        manifest.get("model"), "model", path, allow_changed=allow_model_change
    )
    common = {"output_dir": Path(output_dir), "progress": progress}
    if run_type == "oneshot":
        options = _options(OneshotJob, invocation, path)
        job = OneshotJob(recipe=recipe, **{**options, "model": model, "overwrite": overwrite},
                         **common)  # fmt: skip
        return Rerun("oneshot", job, manifest, path)
    if run_type == "run":
        options = _options(RunJob, invocation, path)
        job = RunJob(
            recipe=recipe,
            **{**options, "model": model, "overwrite": overwrite, "resume": resume},
            **common,
        )
        return Rerun("run", job, manifest, path)
    # finetune: the recorded training arguments are the recipe's values merged with the flags.
    if "training" not in manifest:
        raise _missing(path, "the training arguments (training)")
    stage = recipe.stages[0]
    training = TrainingConfig.model_validate(manifest["training"])
    if manifest.get("teacher"):
        teacher = check_source(
            manifest["teacher"], "distillation teacher", path, allow_changed=allow_model_change
        )
        training = training.model_copy(update={"distill_teacher": teacher or DEFAULT_MODEL})
    stage = stage.model_copy(update={"training": training})
    options = _options(FinetuneJob, invocation, path)
    job = FinetuneJob(
        stage=stage,
        recipe_yaml=recipe.to_yaml(),
        training=training,
        **{**options, "model": model, "overwrite": overwrite, "resume": resume},
        **common,
    )
    return Rerun("finetune", job, manifest, path, int(invocation.get("world_size") or 1))


def compare_data(rerun: Rerun, new_manifest: dict[str, Any]) -> list[str]:
    """Where the re-run read other data than the recorded run (by fingerprint); [] when none."""
    old, new = rerun.manifest.get("data_fingerprint"), new_manifest.get("data_fingerprint")
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [name for name in old if old.get(name) != new.get(name)]
    return ["data"]


#: `reciprune run` options whose value a manifest records: not allowed with --from-manifest.
RECORDED_RUN_FLAGS = (
    "--set", "--stage", "--model", "--dataset", "--num-calibration-samples",
    "--calibration-seq-length", "--calibration-batch-size", "--seed", "--distill-teacher",
    "--nproc-per-node", "--eval-ppl", "--no-eval-ppl", "--ppl-file", "--ppl-samples",
)  # fmt: skip


def run_from_manifest(args: Any, argv: list[str], *, torchrun: Callable[..., int]) -> int:
    """`reciprune run --from-manifest M --output-dir NEW`: the recorded job, run again.

    `args` are the parsed `reciprune run` arguments; `torchrun(n, argv)` starts a reciprune
    command on n processes (a finetune recorded with several)."""
    given = sorted({f for f in RECORDED_RUN_FLAGS for a in argv if a == f or a.startswith(f + "=")})
    if given:
        raise ReciPruneError(
            f"--from-manifest re-runs exactly what the manifest records, so {', '.join(given)} "
            "cannot be given with it. To change something, run the recipe.yaml beside the "
            "manifest with `reciprune run --recipe` and the options you want."
        )
    output = Path(args.output_dir)
    rerun = prepare_rerun(
        args.from_manifest,
        output,
        allow_model_change=args.allow_model_change,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(f"re-running the {rerun.run_type} recorded in {rerun.manifest_path}")
    if rerun.run_type == "oneshot":
        from reciprune.pipelines.jobs import run_oneshot_job

        run_oneshot_job(rerun.job)
    elif rerun.run_type == "finetune" and rerun.world_size > 1:
        recipe_file = _stage_file(rerun)
        try:
            code = torchrun(rerun.world_size, _finetune_argv(rerun.job, recipe_file))
        finally:
            Path(recipe_file).unlink(missing_ok=True)
        if code != 0:
            return code
    elif rerun.run_type == "finetune":
        from reciprune.pipelines.jobs import run_finetune_job

        run_finetune_job(rerun.job)
    else:
        from reciprune.pipelines.multistage import run_stages

        for stage, folder in run_stages(rerun.job):
            print(f"stage {stage}: {folder}")
    new = json.loads((output / MANIFEST_FILE).read_text(encoding="utf-8"))
    differ = compare_data(rerun, new)
    if differ:
        print(
            f"note: the data read now has another fingerprint than recorded ({', '.join(differ)}): "
            "the data set or its cache changed, so the result may differ."
        )
    print(f"saved to {output}")
    return 0


def _stage_file(rerun: Rerun) -> str:
    """A recipe file whose one stage carries the recorded training arguments (for torchrun)."""
    handle, name = tempfile.mkstemp(suffix=".yaml", prefix=".reciprune-rerun-")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(Recipe(stages=[rerun.job.stage]).to_yaml())
    return name


def _finetune_argv(job: Any, recipe_file: str) -> list[str]:
    command = ["finetune", "--recipe", recipe_file, "--output-dir", str(job.output_dir),
               "--ppl-samples", str(job.ppl_samples)]  # fmt: skip
    if job.model is not None:
        command += ["--model", job.model]
    if job.training.distill_teacher is not None:
        command += ["--distill-teacher", job.training.distill_teacher]
    if job.ppl_file:
        command += ["--ppl-file", job.ppl_file]
    switches = {
        "--no-eval-ppl": not job.eval_ppl,
        "--overwrite": job.overwrite,
        "--resume": job.resume,
        "--trust-remote-code": job.trust_remote_code,
        "--no-progress": not job.progress,
    }
    return command + [flag for flag, on in switches.items() if on]
