"""Reference pages for modifiers, generated from their pydantic schemas and docstrings."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import yaml
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from reciprune.modifiers.base import Modifier
from reciprune.modifiers.registry import available_modifiers


def _type_name(field: FieldInfo) -> str:
    annotation = field.annotation
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> object:
    default = field.get_default(call_default_factory=True)
    return None if default is PydanticUndefined else default


def _example(cls: type[Modifier]) -> str:
    fields = {
        name: _default(field)
        for name, field in cls.model_fields.items()
        if name not in ("start", "end")
        and (_default(field) is not None or name in cls.example_fields)
    }
    fields.update(cls.example_fields)
    stage = "finetune" if "oneshot" not in cls.run_types else "oneshot"
    modifiers = {**cls.example_before, cls.type_name(): fields}
    snippet = {"example_stage": {"run_type": stage, "example_modifiers": modifiers}}
    return yaml.safe_dump(snippet, sort_keys=False).rstrip()


def reference_page(cls: type[Modifier]) -> str:
    """Markdown reference page of one modifier."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = [f"# {cls.type_name()}", "", doc, ""]
    if cls.paper:
        lines += [f"**Paper:** {cls.paper}", ""]
    lines += [
        f"**Stages:** {', '.join(cls.run_types)} · **needs calibration data:** "
        f"{'yes' if cls.needs_calibration else 'no'}",
        "",
        "## Fields",
        "",
        "| field | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in cls.model_fields.items():
        default = json.dumps(_default(field))
        description = (field.description or "").replace("|", "\\|")
        type_name = _type_name(field).replace("|", "\\|")
        lines.append(f"| `{name}` | `{type_name}` | `{default}` | {description} |")
    if cls.legacy_fields:
        lines += ["", "## SparseML field names accepted", ""]
        for old, new in cls.legacy_fields.items():
            lines.append(f"- `{old}` → " + (f"`{new}`" if new else "accepted and ignored"))
    lines += ["", "## Recipe snippet", "", "```yaml", _example(cls), "```", ""]
    return "\n".join(lines)


def write_reference_pages(folder: Path) -> list[Path]:
    """Write `<Name>.md` for every registered modifier into `folder`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cls in available_modifiers().items():
        path = folder / f"{name}.md"
        path.write_text(reference_page(cls))
        written.append(path)
    return written
