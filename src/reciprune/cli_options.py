"""Command-line flags derived from the options models (`reciprune.recipe.options`).

Every flag's default is `argparse.SUPPRESS`, so the parsed namespace holds only what the user
typed: the model's defaults apply otherwise, and a recipe's stage settings sit between the two.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic_core import PydanticUndefined

from reciprune.recipe.options import Options, flag_name, validate_options


def _describe(text: str, default: Any, switch: str | None) -> str:
    text = text.rstrip()
    if switch == "both":
        return f"{text.rstrip('.')} (default {'on' if default else 'off'})."
    if switch is not None or default is None or default is PydanticUndefined:
        return text
    return f"{text.rstrip('.')} (default: {default})."


def _flag_kwargs(cls: type[Options], name: str, help_text: str | None) -> tuple[list[str], dict]:
    info = cls.model_fields[name]
    meta = cls.field_meta(name)
    flags = [flag_name(name), *meta.get("flags", [])]
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    annotation = info.annotation
    switch = None
    if annotation is bool:
        switch = meta.get("switch", cls.default_switch)
        if switch == "both":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif switch == "off":
            flags = [f"--no-{name.replace('_', '-')}"]
            kwargs["action"] = "store_false"
        else:
            kwargs["action"] = "store_true"
    elif typing.get_origin(annotation) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    else:
        # `X | None` flags take an X; Literal annotations were handled above.
        base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        kwargs["type"] = base if base in (int, float) else str
        metavar = meta.get("metavar", {int: "N", float: "X"}.get(base))
        if metavar:
            kwargs["metavar"] = metavar
        kwargs.update({key: meta[key] for key in ("nargs", "const") if key in meta})
    if info.is_required():
        kwargs["required"] = True
    kwargs["help"] = _describe(help_text or info.description or "", info.default, switch)
    return flags, kwargs


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Options],
    *,
    skip: tuple[str, ...] = (),
    help: dict[str, str] | None = None,
) -> None:
    """One flag per field of `cls` (minus `skip`), help from the field."""
    for name in cls.model_fields:
        if name in skip:
            continue
        flags, kwargs = _flag_kwargs(cls, name, (help or {}).get(name))
        parser.add_argument(*flags, **kwargs)


def options_from(args: argparse.Namespace, cls: type[Options]) -> Options:
    """`cls` from the flags the user gave (`model_fields_set` is exactly those)."""
    return validate_options(cls, given_flags(args, cls))


def given_flags(args: argparse.Namespace, cls: type[Options]) -> dict[str, Any]:
    """The values of `cls`'s flags the user typed (not validated)."""
    return {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
