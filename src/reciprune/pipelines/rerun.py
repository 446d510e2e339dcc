"""`reciprune run --from-manifest M`: run again what a manifest records, into a new folder.

A manifest of `reciprune oneshot`, `reciprune finetune` or `reciprune run` holds the recipe that
was applied (its text, checked against `recipe_sha256`; or `recipe.yaml` beside it), the job's
option groups (`options`: model, calibration, evaluation, training, ...) and the fingerprints of the model (and teacher) it started
from. Each kind is re-run by the same job that wrote it, so a oneshot manifest gives a oneshot
output folder and a run manifest a run folder. Everything is checked before any weights load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reciprune.errors import ReciPruneError
from reciprune.export.manifest import sha256_text
from reciprune.export.save import MANIFEST_FILE, RECIPE_FILE
from reciprune.models import DEFAULT_MODEL, resolve_model
from reciprune.pipelines.jobs import JOB_KINDS, Job, load_job
from reciprune.recipe import Recipe, load_recipe
from reciprune.recipe.options import OutputOptions


@dataclass
class Rerun:
    """What a manifest asks to run again, ready to start (see `prepare_rerun`)."""

    job: Job
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
        return load_recipe(stored)
    beside = path.parent / RECIPE_FILE
    if beside.is_file() and sha256_text(beside.read_text(encoding="utf-8")) == expected:
        return load_recipe(beside.read_text(encoding="utf-8"))
    raise ReciPruneError(
        f"--from-manifest {path}: neither the recipe stored in the manifest nor {beside} has the "
        f"recorded hash {expected[:12]}…, so the recipe that was applied is not available (it "
        "was changed or removed). Restore the original recipe.yaml beside the manifest."
    )


def check_source(
    recorded: dict[str, Any] | None, what: str, path: Path, *, allow_changed: bool
) -> str | None:
    """The spec to load for a recorded model source, after checking that it still resolves and
    has the recorded fingerprint (unless `allow_changed`). None for the embedded default."""
    if not recorded or "fingerprint" not in recorded:
        raise _missing(path, f"the {what} and its fingerprint")
    spec, where = recorded.get("spec"), recorded.get("path")
    # A local path recorded relative to the first run's working folder: prefer the absolute one.
    local = where and where != spec and Path(where).exists()
    for candidate in [where, spec] if local else [spec]:
        try:
            source = resolve_model(candidate)
            break
        except ReciPruneError as exc:
            error = exc
    else:
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


def _recorded_options(manifest: dict[str, Any], kind: str, path: Path) -> dict[str, Any]:
    """The job's option groups as the manifest records them (`options`)."""
    if not isinstance(manifest.get("options"), dict):
        raise _missing(path, "the options it ran with (options)")
    options = dict(manifest["options"])
    if kind == "finetune" and "training" not in options:
        raise _missing(path, "the training arguments (options.training)")
    return options


def prepare_rerun(
    manifest_path: str | Path,
    output: OutputOptions,
    *,
    allow_model_change: bool = False,
    trust_remote_code: bool = False,
) -> Rerun:
    """Rebuild the job a manifest records, writing to `output`; every check (recipe hash,
    options, model and teacher fingerprints, trust_remote_code) runs here, before any weights
    load."""
    manifest, path = load_manifest(manifest_path)
    kind = manifest.get("run_type")
    if kind not in JOB_KINDS:
        raise _missing(path, "which command wrote it (run_type)")
    options = _recorded_options(manifest, kind, path)
    model = dict(options.get("model", {}))
    if model.get("trust_remote_code") and not trust_remote_code:
        raise ReciPruneError(
            f"--from-manifest {path}: the recorded run allowed the model's own code to run "
            "(--trust-remote-code). Pass --trust-remote-code again if you still trust it."
        )
    recipe = manifest_recipe(manifest, path)
    model["model"] = check_source(
        manifest.get("model"), "model", path, allow_changed=allow_model_change
    )
    options["model"] = model
    if kind == "finetune" and manifest.get("teacher"):
        teacher = check_source(
            manifest["teacher"], "distillation teacher", path, allow_changed=allow_model_change
        )
        options["training"] = {**options["training"], "distill_teacher": teacher or DEFAULT_MODEL}
    try:
        job = load_job({"kind": kind, "recipe": recipe, "options": options}, output=output)
    except ValueError as exc:
        raise ReciPruneError(
            f"--from-manifest {path}: the recorded options do not validate ({exc}); it was "
            "written by another version of reciprune."
        ) from None
    return Rerun(job, manifest, path, int(manifest.get("world_size") or 1))


def compare_data(rerun: Rerun, new_manifest: dict[str, Any]) -> list[str]:
    """Where the re-run read other data than the recorded run (by fingerprint); [] when none."""
    old, new = rerun.manifest.get("data_fingerprint"), new_manifest.get("data_fingerprint")
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [name for name in old if old.get(name) != new.get(name)]
    return ["data"]


def run_rerun(rerun: Rerun) -> None:
    """Run the rebuilt job as the command that wrote it (`compare_data` then says whether the
    data read now has another fingerprint than recorded)."""
    job = rerun.job
    if job.kind == "oneshot":
        from reciprune.pipelines.oneshot import run_oneshot_job

        run_oneshot_job(job)
    elif job.kind == "finetune" and rerun.world_size > 1:
        from reciprune.pipelines.launch import run_under_torchrun

        code = run_under_torchrun(job, rerun.world_size)
        if code != 0:
            raise ReciPruneError(
                f"the re-run failed under torchrun (exit status {code}); its messages are above."
            )
    elif job.kind == "finetune":
        from reciprune.pipelines.finetune_job import run_finetune_job

        run_finetune_job(job)
    else:
        from reciprune.pipelines.multistage import run_stages

        list(run_stages(job))  # a generator: consuming it runs every stage
