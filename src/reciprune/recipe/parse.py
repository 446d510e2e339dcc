"""Read a recipe (SparseML, explicit or plain-list form), apply `--set` overrides, validate.

Every form is first normalised to a list of raw stages that remember where each value came
from, so that any problem is reported as one paragraph starting with its location, e.g.
`recipe.yaml › pruning_stage › obcq_modifiers › SparseGPTModifier › sparsty: ...`.
Only `yaml.safe_load` reads YAML, and nothing here touches model weights.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from reciprune.errors import RecipeError
from reciprune.modifiers.base import Modifier
from reciprune.modifiers.registry import get_modifier_class
from reciprune.recipe.options import Options
from reciprune.recipe.schema import RUN_TYPES, STAGE_SETTINGS, Recipe, Stage

#: Top-level keys that carry no stage and are ignored in every form.
IGNORED_TOP_LEVEL = ("version", "metadata")
#: Run-type spellings from SparseML / llm-compressor recipes, mapped to ours.
RUN_TYPE_ALIASES = {"train": "finetune", "training": "finetune", "finetuning": "finetune"}
#: Stage name used for recipes written as a bare list of modifiers.
DEFAULT_STAGE = "default"

_SEP = " › "
_TEXT_ORIGIN = "<recipe text>"
_EXAMPLE = "e.g. 'pruning_stage: {obcq_modifiers: {SparseGPTModifier: {sparsity: 0.5}}}'"


@dataclass
class _RawModifier:
    """One modifier entry as written: its type name, its fields, and where it was written."""

    type: str
    fields: dict[str, Any]
    where: tuple[str, ...]
    set_by: dict[str, str] = field(default_factory=dict)  # field -> the --set that wrote it


@dataclass
class _RawStage:
    """One stage as written, before validation."""

    name: str
    run_type: Any
    modifiers: list[_RawModifier]
    where: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # training:, calibration: as written


def _fail(where: Sequence[str], message: str) -> RecipeError:
    return RecipeError(f"{_SEP.join(where)}: {message}")


def _did_you_mean(word: str, options: Sequence[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f" Did you mean {close[0]!r}?" if close else ""


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


# reading ---------------------------------------------------------------------------------------
def _read_source(source: str | Path) -> tuple[str, str]:
    """(origin label, YAML text) for a path or for YAML text."""
    if isinstance(source, str) and ("\n" in source or ":" in source):
        try:
            is_file = Path(source).is_file()
        except (OSError, ValueError):  # too long or odd for a path: it is YAML text
            is_file = False
        if not is_file:
            return _TEXT_ORIGIN, source
    path = Path(source)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise RecipeError(
            f"{path}: recipe file not found{hint}. Pass the path of a YAML recipe, or the recipe "
            "text itself."
        )
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc}).") from exc


# A recipe is a few hundred values; an "alias bomb" (anchors of anchors) expands to billions,
# which an error message echoing the value would print.
MAX_EXPANDED_VALUES = 100_000


def _expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """How many values `value` holds once every alias is expanded (shared parts counted once each
    time they are referenced, each computed once)."""
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in sizes:
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = 1 + sum(_expanded_size(item, sizes) for item in items)
    return sizes[id(value)]


def _safe_load(text: str, origin: str) -> Any:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = [origin]
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        if mark is not None:
            where.append(f"line {mark.line + 1}, column {mark.column + 1}")
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        hint = "Check the indentation, colons and quotes around that line."
        if "constructor for the tag" in str(problem):
            hint = (
                "Recipes are read as plain YAML: write the modifier as a key "
                "(`SparseGPTModifier: {sparsity: 0.5}`) instead of a `!Tag`."
            )
        raise _fail(where, f"invalid YAML: {detail}. {hint}") from None
    if _expanded_size(data, {}) > MAX_EXPANDED_VALUES:
        raise _fail(
            [origin],
            f"the YAML expands to more than {MAX_EXPANDED_VALUES:,} values through its anchors and "
            "aliases (&name / *name). A recipe needs a few hundred: write the values out, or use "
            "fewer nested alias references.",
        )
    return data


# normalising the three forms -------------------------------------------------------------------
def _normalise(data: Any, origin: str) -> list[_RawStage]:
    """The stages of a recipe in any of its forms, in the order written."""
    top = (origin,)
    if data is None or data == {} or data == []:
        raise _fail(
            top, f"the recipe is empty. Write at least one stage with one modifier, {_EXAMPLE}."
        )
    if isinstance(data, list):
        return [_plain_stage(data, top, "")]
    if not isinstance(data, Mapping):
        raise _fail(
            top,
            f"a recipe is a mapping of stage names to stages, but this file holds {_kind(data)}. "
            f"Write a stage, {_EXAMPLE}.",
        )
    data = {str(k): v for k, v in data.items()}
    keys = [k for k in data if k not in IGNORED_TOP_LEVEL]
    if "stages" in data:
        return _explicit_stages(data, keys, top)
    if "modifiers" in data:
        _only_key("modifiers", keys, top)
        return [_plain_stage(data["modifiers"], top, "modifiers")]
    if not keys:
        raise _fail(
            top, f"the recipe has no stage (only {', '.join(data)}). Write one, {_EXAMPLE}."
        )
    groups = [k for k in keys if _is_group(k)]
    if groups and len(groups) == len(keys):
        # Top-level `<group>_modifiers:` without a stage around them: one default stage.
        return [_sparseml_stage(DEFAULT_STAGE, {k: data[k] for k in keys}, top)]
    if groups:
        raise _fail(
            (*top, groups[0]),
            "modifier groups go inside a stage when the recipe has stages; indent "
            f"'{groups[0]}:' under one of the stages ({', '.join(k for k in keys if k not in groups)}).",
        )
    if "" in keys:
        raise _fail(top, "a stage has an empty name. Name it, e.g. 'sparsity_stage:'.")
    return [_sparseml_stage(name, data[name], (*top, name)) for name in keys]


def _only_key(key: str, keys: Sequence[str], top: tuple[str, ...]) -> None:
    for other in keys:
        if other != key:
            options = (key, *IGNORED_TOP_LEVEL)
            raise _fail(
                (*top, other),
                f"unknown top-level key beside '{key}'.{_did_you_mean(other, options)} A recipe "
                f"with '{key}:' may only also have {', '.join(repr(o) for o in IGNORED_TOP_LEVEL)}.",
            )


def _is_group(key: str) -> bool:
    return key == "modifiers" or key.endswith("_modifiers")


def _sparseml_stage(name: str, body: Any, where: tuple[str, ...]) -> _RawStage:
    """A SparseML stage: `<group>_modifiers:` mappings (or lists) and an optional `run_type:`."""
    if body is None or body == {}:
        raise _fail(
            where,
            "the stage is empty. Give it a '<group>_modifiers:' mapping of modifier names to "
            "their fields, e.g. 'obcq_modifiers: {SparseGPTModifier: {sparsity: 0.5}}'.",
        )
    if not isinstance(body, Mapping):
        raise _fail(
            where,
            f"a stage must be a mapping holding '<group>_modifiers:' (and optionally "
            f"'run_type:'), but it is {_kind(body)}. Indent the modifier groups under the stage name.",
        )
    body = {str(k): v for k, v in body.items()}  # YAML reads `1:` as an int key
    run_type = None
    settings: dict[str, Any] = {}
    modifiers: list[_RawModifier] = []
    for key, value in body.items():
        if key == "run_type":
            run_type = value
        elif key in STAGE_SETTINGS:
            settings[key] = value
        elif _is_group(key):
            modifiers.extend(_group_entries(value, (*where, key)))
        else:
            try:
                get_modifier_class(key)
                hint = (
                    f" '{key}' is a modifier: put it inside a group, e.g. "
                    f"'pruning_modifiers: {{{key}: {{...}}}}'."
                )
            except RecipeError:
                plural = (f"{key}s",) if key.endswith("_modifier") else ()  # a missing 's'
                hint = _did_you_mean(key, ("run_type", *STAGE_SETTINGS, *plural, "pruning_modifiers"))
            raise _fail(
                (*where, key),
                f"unknown key in stage '{name}'.{hint} A stage holds '<group>_modifiers:' "
                "mappings (any group name ending in '_modifiers') and optionally 'run_type:', "
                "'training:' (finetune) and 'calibration:' (oneshot).",
            )
    written = str(run_type).strip().lower()
    dense_finetune = (
        settings.get("training") is not None
        or RUN_TYPE_ALIASES.get(written, written) == "finetune"
    )
    if not modifiers and not dense_finetune:
        raise _fail(
            where,
            "the stage has no modifier. Add a '<group>_modifiers:' mapping, e.g. "
            "'obcq_modifiers: {SparseGPTModifier: {sparsity: 0.5}}' (only a 'run_type: "
            "finetune' stage may have none: it fine-tunes the dense model).",
        )
    return _RawStage(name, run_type, modifiers, where, settings)


def _group_entries(value: Any, where: tuple[str, ...]) -> list[_RawModifier]:
    """Modifiers of one `<group>_modifiers:` group: a mapping, or a list of entries."""
    if value is None or value == {} or value == []:
        raise _fail(
            where, "the group is empty. List its modifiers as 'ModifierName: {field: value}'."
        )
    if isinstance(value, Mapping):
        return [_modifier_fields(str(k), v, (*where, str(k))) for k, v in value.items()]
    if isinstance(value, list):
        last = where[-1]
        return [
            _modifier_entry(entry, (*where[:-1], f"{last}[{i}]")) for i, entry in enumerate(value)
        ]
    raise _fail(
        where,
        f"a modifier group must map modifier names to their fields, but it is {_kind(value)}. "
        "Write e.g. 'SparseGPTModifier: {sparsity: 0.5}' under it.",
    )


def _modifier_entry(entry: Any, where: tuple[str, ...]) -> _RawModifier:
    """A list item: `{type: Name, field: value}` or `{Name: {field: value}}`."""
    if isinstance(entry, Mapping) and "type" in entry:
        name = entry["type"]
        if not isinstance(name, str) or not name:
            raise _fail((*where, "type"), f"'type' must be a modifier name, not {_kind(name)}.")
        fields = {k: v for k, v in entry.items() if k != "type"}
        return _modifier_fields(name, fields, (*where, name))
    if isinstance(entry, Mapping) and len(entry) == 1:
        ((name, fields),) = entry.items()
        if isinstance(fields, Mapping | None):
            return _modifier_fields(str(name), fields, (*where, str(name)))
    raise _fail(
        where,
        f"a modifier entry is written '{{type: ModifierName, field: value, ...}}' (or "
        f"'{{ModifierName: {{field: value}}}}'), but this one is {_kind(entry)}.",
    )


def _modifier_fields(name: str, fields: Any, where: tuple[str, ...]) -> _RawModifier:
    if fields is None:
        fields = {}
    if not isinstance(fields, Mapping):
        raise _fail(
            where,
            f"the fields of {name} must be a mapping of field: value, but they are {_kind(fields)}. "
            "Write e.g. 'sparsity: 0.5' indented under the modifier name.",
        )
    return _RawModifier(name, {str(k): v for k, v in fields.items()}, where)


def _plain_stage(entries: Any, top: tuple[str, ...], label: str) -> _RawStage:
    """A bare list of modifiers: one stage named 'default'."""
    where = (*top, label) if label else top
    if entries is None or entries == []:
        raise _fail(where, "the list of modifiers is empty. Add '- type: ModifierName' entries.")
    if not isinstance(entries, list):
        raise _fail(where, f"'modifiers' must be a list of modifier entries, not {_kind(entries)}.")
    modifiers = [
        _modifier_entry(entry, (*top, f"{label}[{i}]")) for i, entry in enumerate(entries)
    ]
    return _RawStage(DEFAULT_STAGE, None, modifiers, where)


_STAGE_KEYS = ("name", "run_type", "modifiers", *STAGE_SETTINGS)


def _explicit_stages(
    data: Mapping[str, Any], keys: Sequence[str], top: tuple[str, ...]
) -> list[_RawStage]:
    """`stages: [{name, run_type, modifiers: [{type: Name, ...}]}]`."""
    _only_key("stages", keys, top)
    stages = data["stages"]
    where = (*top, "stages")
    if stages is None or stages == []:
        raise _fail(
            where,
            "'stages' is empty. List at least one stage with 'name', 'run_type' and 'modifiers'.",
        )
    if not isinstance(stages, list):
        raise _fail(where, f"'stages' must be a list of stages, not {_kind(stages)}.")
    result: list[_RawStage] = []
    first_index: dict[str, int] = {}
    for i, stage in enumerate(stages):
        here = (*top, f"stages[{i}]")
        if not isinstance(stage, Mapping):
            raise _fail(
                here,
                f"a stage is a mapping with 'name', 'run_type' and 'modifiers', not {_kind(stage)}.",
            )
        stage = {str(k): v for k, v in stage.items()}
        for key in stage:
            if key not in _STAGE_KEYS:
                raise _fail(
                    (*here, key),
                    f"unknown stage key.{_did_you_mean(key, _STAGE_KEYS)} A stage has "
                    "'name', 'run_type' and 'modifiers'.",
                )
        name = stage.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(
                (*here, "name"), f"every stage needs a non-empty 'name' (got {_kind(name)})."
            )
        if name in first_index:
            raise _fail(
                (*here, "name"),
                f"stage name {name!r} is already used by stages[{first_index[name]}]; stage "
                "names must be unique. Rename one of them.",
            )
        first_index[name] = i
        mods = stage.get("modifiers")
        if mods in (None, []):
            if stage.get("training") is None and stage.get("run_type") != "finetune":
                raise _fail(
                    (*here, "modifiers"),
                    f"stage {name!r} has no modifiers. Add entries like "
                    "'- type: SparseGPTModifier'.",
                )
            mods = []  # a dense fine-tuning stage (`Recipe.to_yaml` writes `modifiers: []`)
        if not isinstance(mods, list):
            raise _fail((*here, "modifiers"), f"'modifiers' must be a list, not {_kind(mods)}.")
        entries = [_modifier_entry(m, (*here, f"modifiers[{j}]")) for j, m in enumerate(mods)]
        settings = {key: stage[key] for key in STAGE_SETTINGS if key in stage}
        result.append(_RawStage(name, stage.get("run_type"), entries, here, settings))
    return result


# overrides -------------------------------------------------------------------------------------
def _apply_overrides_raw(stages: list[_RawStage], overrides: Sequence[str]) -> None:
    """Apply `stage.Modifier.field=value` (stage optional for one-stage recipes) in place."""
    names = [s.name for s in stages]
    for text in overrides:
        where = (f"--set {text!r}",)
        key, sep, value_text = text.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise _fail(
                where,
                "write overrides as 'stage.Modifier.field=value' (or 'Modifier.field=value' when "
                "the recipe has one stage), e.g. 'pruning_stage.SparseGPTModifier.sparsity=0.6'.",
            )
        field_name, modifier_spec = parts[-1], parts[-2]
        stage_name = ".".join(parts[:-2]) or None
        if stage_name is None and len(stages) != 1:
            raise _fail(
                where,
                f"the recipe has {len(stages)} stages ({', '.join(names)}); say which one, "
                f"as in '{names[0]}.{key.strip()}={value_text}'.",
            )
        if stage_name is not None and stage_name not in names:
            raise _fail(
                where,
                f"the recipe has no stage named {stage_name!r}."
                f"{_did_you_mean(stage_name, names, 0.5)} Its stages are: {', '.join(names)}.",
            )
        stage = stages[0 if stage_name is None else names.index(stage_name)]
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise _fail(
                where, f"the value {value_text!r} is not valid YAML ({problem}); quote it."
            ) from None
        if modifier_spec in STAGE_SETTINGS:
            # `stage.training.field=value` sets a training argument of a finetune stage (and
            # `stage.calibration.field=value` a calibration option of a oneshot stage).
            current = stage.settings.get(modifier_spec) or {}
            if not isinstance(current, Mapping):
                raise _fail(where, f"the stage's '{modifier_spec}:' is not a mapping.")
            stage.settings[modifier_spec] = {**current, field_name: value}
            continue
        modifier = _override_target(stage, modifier_spec, where)
        for existing in list(modifier.fields):
            if existing != field_name and _canonical(modifier.type, existing) == _canonical(
                modifier.type, field_name
            ):
                del modifier.fields[existing]  # the override replaces a legacy spelling too
        modifier.fields[field_name] = value
        modifier.set_by[field_name] = text


def _override_target(stage: _RawStage, spec: str, where: tuple[str, ...]) -> _RawModifier:
    name, _, index_text = spec.partition("[")
    present = [m.type for m in stage.modifiers]
    matching = [m for m in stage.modifiers if m.type == name]
    if not matching:
        raise _fail(
            where,
            f"stage {stage.name!r} has no {name}.{_did_you_mean(name, present, 0.5)} Its modifiers "
            f"are: {', '.join(present)}.",
        )
    if index_text:
        try:
            return matching[int(index_text.rstrip("]"))]
        except (ValueError, IndexError):
            raise _fail(
                where, f"{spec!r}: stage {stage.name!r} has {len(matching)} {name} (index from 0)."
            ) from None
    if len(matching) > 1:
        raise _fail(
            where,
            f"stage {stage.name!r} has {len(matching)} {name}; say which with {name}[0] .. "
            f"{name}[{len(matching) - 1}].",
        )
    return matching[0]


def _canonical(type_name: str, field_name: str) -> str:
    try:
        cls = get_modifier_class(type_name)
    except RecipeError:
        return field_name
    return cls.legacy_fields.get(field_name) or field_name


# validation ------------------------------------------------------------------------------------
def _validate(stages: list[_RawStage]) -> Recipe:
    built: list[Stage] = []
    for stage in stages:
        modifiers = [_build_modifier(m) for m in stage.modifiers]
        run_type, reason = _run_type(stage, modifiers)
        for index, (raw, modifier) in enumerate(zip(stage.modifiers, modifiers, strict=True)):
            problem = modifier.check_stage(modifiers[:index])
            if problem:
                raise _fail(raw.where, problem)
            if run_type not in modifier.run_types:
                raise _fail(
                    raw.where,
                    f"{raw.type} cannot run in a {run_type} stage ({reason}); it supports "
                    f"{' and '.join(modifier.run_types)}. Move it to a stage with run_type: "
                    f"{modifier.run_types[0]}, or change this stage's run_type.",
                )
        settings = {key: _build_settings(stage, key, run_type) for key in stage.settings}
        built.append(Stage(name=stage.name, run_type=run_type, modifiers=modifiers, **settings))
    # The normalised stages are never empty and their names unique (checked while reading), so
    # Recipe's own checks cannot fail here.
    return Recipe(stages=built)


def _build_settings(stage: _RawStage, key: str, run_type: str) -> Options:
    """The stage's `training:` or `calibration:` mapping validated, the failing field named."""
    cls, belongs_to = STAGE_SETTINGS[key]
    value = stage.settings[key]
    where = (*stage.where, key)
    if run_type != belongs_to:
        raise _fail(
            where,
            f"'{key}:' sets {belongs_to} options, but this is a {run_type} stage. Remove it, or "
            f"set 'run_type: {belongs_to}'.",
        )
    if not isinstance(value, Mapping):
        raise _fail(where, f"'{key}:' must be a mapping of {belongs_to} options, not {_kind(value)}.")
    fields = {str(k): v for k, v in value.items()}
    allowed = cls.recipe_fields()
    for name in fields:
        if name not in allowed:
            raise _fail(
                (*where, name),
                f"unknown {key} option.{_did_you_mean(name, allowed)} See `reciprune "
                f"{belongs_to} --help` for the options (flags use dashes, recipes underscores).",
            )
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(p) for p in error.get("loc", ())]
        raise _fail((*where, *loc), _plain_message(error)) from None


def _run_type(stage: _RawStage, modifiers: list[Modifier]) -> tuple[str, str]:
    """The stage's run type and why (written, or inferred from its modifiers and name)."""
    raw = stage.run_type
    if raw is not None:
        text = str(raw).strip().lower()
        text = RUN_TYPE_ALIASES.get(text, text)
        if not isinstance(raw, str) or text not in RUN_TYPES:
            raise _fail(
                (*stage.where, "run_type"),
                f"unknown run_type {raw!r}.{_did_you_mean(str(raw), RUN_TYPES, 0.5)} Use "
                f"{' or '.join(repr(r) for r in RUN_TYPES)}, or leave it out to infer it.",
            )
        return text, f"run_type: {raw}"
    if stage.settings.get("training") is not None:
        return "finetune", "run_type inferred as finetune from its 'training:'"
    finetune_only = [m.type_name() for m in modifiers if "oneshot" not in m.run_types]
    if finetune_only:
        return "finetune", f"run_type inferred from {finetune_only[0]}, which only fine-tunes"
    lowered = stage.name.lower()
    if "finetun" in lowered or "train" in lowered:
        return "finetune", f"run_type inferred as finetune from the stage name {stage.name!r}"
    return "oneshot", "run_type inferred as oneshot"


def _build_modifier(raw: _RawModifier) -> Modifier:
    try:
        cls = get_modifier_class(raw.type)
    except RecipeError as exc:
        raise _fail(raw.where, str(exc)) from None
    try:
        return cls.model_validate(raw.fields)
    except ValidationError as exc:
        problems = _problems(exc, cls, raw)
    except RecipeError as exc:  # raised directly by a validator
        problems = [((), str(exc))]
    (first_loc, message), *rest = problems
    if rest:
        message += " Also: " + "; ".join(
            f"{_SEP.join(loc) or raw.type}: {msg}" for loc, msg in rest
        )
    raise _fail((*raw.where, *first_loc), message)


def _problems(
    exc: ValidationError, cls: type[Modifier], raw: _RawModifier
) -> list[tuple[tuple[str, ...], str]]:
    """Each pydantic error as (location below the modifier, readable message)."""
    by_field: dict[Any, list[dict[str, Any]]] = {}
    for error in exc.errors(include_url=False):
        by_field.setdefault(error["loc"][0] if error["loc"] else None, []).append(dict(error))
    problems = []
    for key, errors in by_field.items():
        if key is not None and _is_union_field(cls, str(key)):
            errors = _pick_union_branch(errors, raw.fields.get(_written_name(cls, raw, str(key))))
        for error in errors:
            loc = _render_loc(cls, raw, error["loc"])
            message = _message(cls, raw, error)
            if key is not None and (written := _written_name(cls, raw, str(key))) in raw.set_by:
                message += f" (value from --set {raw.set_by[written]!r})"
            problems.append((loc, message))
    return problems


def _is_union_field(cls: type[Modifier], name: str) -> bool:
    info = cls.model_fields.get(name)
    if info is None:
        return False
    args = [a for a in get_args(info.annotation) if a is not type(None)]
    return get_origin(info.annotation) in (Union, UnionType) and len(args) > 1


def _pick_union_branch(errors: list[dict[str, Any]], value: Any) -> list[dict[str, Any]]:
    """Of the errors of every union member, keep the member the value was evidently meant as."""
    tagged = [e for e in errors if len(e["loc"]) > 1]
    if not tagged or len(tagged) != len(errors):
        return errors
    want = "dict" if isinstance(value, Mapping) else "list" if isinstance(value, list) else None
    for error in tagged:
        tag = str(error["loc"][1])
        error["loc"] = (error["loc"][0], *error["loc"][2:])
        error["_tag"] = tag
    chosen = [
        e
        for e in tagged
        if (want and e["_tag"].startswith(want))
        or (not want and not e["_tag"].startswith(("dict", "list")))
    ]
    specific = [e for e in (chosen or tagged) if not e["type"].endswith("_type")]
    if specific:
        return specific[:1] if not chosen else specific
    if chosen:
        return chosen
    tags = " or ".join(sorted({e["_tag"] for e in tagged}))
    merged = dict(
        tagged[0], loc=(tagged[0]["loc"][0],), type="union", msg=f"Input should be {tags}"
    )
    merged["input"] = value
    return [merged]


def _written_name(cls: type[Modifier], raw: _RawModifier, name: str) -> str:
    """The name the user wrote for field `name` (a legacy spelling when that is what was used)."""
    if name in raw.fields:
        return name
    for old, new in cls.legacy_fields.items():
        if new == name and old in raw.fields:
            return old
    return name


def _render_loc(cls: type[Modifier], raw: _RawModifier, loc: Sequence[Any]) -> tuple[str, ...]:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0:
            parts.append(_written_name(cls, raw, str(item)))
        elif isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif item == "[key]":
            parts[-1] += " (key)"
        else:
            parts.append(str(item))
    return tuple(parts)


def _message(cls: type[Modifier], raw: _RawModifier, error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        options = [*cls.model_fields, *cls.legacy_fields]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f" did you mean {close[0]!r}?" if close else ""
        return (
            f"unknown field {name!r} for {cls.type_name()};{hint or ' no such field.'} "
            f"Its fields are: {', '.join(cls.model_fields)}."
        )
    message = _plain_message(error)
    if kind in ("value_error", "assertion_error"):
        return message
    value = error.get("input")
    got = "" if isinstance(value, Mapping) and kind != "union" else f" (got {_echo(value)})"
    field_name = str(error["loc"][0]) if error["loc"] else ""
    info = cls.model_fields.get(field_name)
    label = field_name
    if (written := _written_name(cls, raw, field_name)) != field_name:
        label = f"{written} (now {field_name})"
    described = f" {label}: {info.description}" if info is not None and info.description else ""
    return f"{message}{got}.{described}"


def _echo(value: Any, limit: int = 200) -> str:
    """`repr(value)` cut to `limit` characters: an error repeats what was written, never pages
    of it (a value built from YAML aliases can be gigabytes long)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _plain_message(error: Mapping[str, Any]) -> str:
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


# public API ------------------------------------------------------------------------------------
def load_recipe(source: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, normalise, override and validate a recipe from a YAML file path or YAML text.

    `source` is YAML text when it is a string holding a newline or ':' that is not an existing
    file. `overrides` are `--set` strings, `stage.Modifier.field=value`. Any problem raises a
    RecipeError whose message starts with its location in the recipe. No weights are loaded.
    """
    origin, text = _read_source(source)
    data = _safe_load(text, origin)
    if origin == _TEXT_ORIGIN and isinstance(data, str) and "\n" not in text.strip():
        # One line that reads as a plain string was meant as a path, not as a recipe.
        raise RecipeError(
            f"{text.strip()}: recipe file not found. Pass the path of a YAML recipe, or the "
            "recipe text itself."
        )
    stages = _normalise(data, origin)
    _apply_overrides_raw(stages, overrides)
    return _validate(stages)


def apply_overrides(
    recipe: Recipe | Mapping[str, Any] | list[Any], overrides: Sequence[str]
) -> Recipe:
    """A new Recipe with `stage.Modifier.field=value` overrides applied, validated again.

    `recipe` is a Recipe or raw recipe data (what `yaml.safe_load` returns, in any form).
    """
    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    stages = _normalise(data, "<recipe>")
    _apply_overrides_raw(stages, overrides)
    return _validate(stages)
