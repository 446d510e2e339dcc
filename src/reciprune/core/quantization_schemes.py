"""compressed-tensors quantization schemes: the presets a recipe may name, config groups built
and checked as QuantizationSchemes, and one-line descriptions of their arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from reciprune.algorithms.observers import WEIGHT_STRATEGIES

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

#: compressed-tensors preset schemes a recipe may name.
SCHEMES: tuple[str, ...] = ("W4A16", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC")
#: Activation strategies: per tensor (static or dynamic), per token or group (dynamic only).
INPUT_STRATEGIES: tuple[str, ...] = ("tensor", "token", "group")
_GROUP_KEYS = ("targets", "weights", "input_activations")


def enum_value(enum_or_str: Any) -> str:
    """The string of a compressed-tensors enum (strategy, type), or the string itself."""
    return str(getattr(enum_or_str, "value", enum_or_str))


def build_scheme(name: str, group: dict[str, Any]) -> QuantizationScheme:
    """One config group as a compressed-tensors QuantizationScheme, or a ValueError saying what
    is not supported (targets default to ['Linear'])."""
    from compressed_tensors.quantization import QuantizationScheme

    if not isinstance(group, dict):
        raise ValueError(f"config_groups.{name} must be a mapping with weights (and optionally "
                         "targets, input_activations)")
    unknown = sorted(set(group) - set(_GROUP_KEYS))
    if unknown:
        raise ValueError(
            f"config_groups.{name} has {', '.join(map(repr, unknown))}; a group takes "
            f"{', '.join(_GROUP_KEYS)} (output activations are not supported)"
        )
    if not group.get("weights"):
        raise ValueError(f"config_groups.{name} needs weights: {{num_bits, type, strategy, ...}}")
    for part in ("weights", "input_activations"):
        args = group.get(part) or {}
        for key in ("observer", "observer_kwargs", "actorder"):
            if key in args:
                raise ValueError(
                    f"config_groups.{name}.{part}.{key}: set the modifier's "
                    f"{'observer' if key.startswith('observer') else 'actorder'} field instead"
                )
    try:
        scheme = QuantizationScheme.model_validate({"targets": ["Linear"], **group})
    except (ValidationError, ValueError, NotImplementedError) as exc:
        raise ValueError(f"config_groups.{name}: {_first_error(exc)}") from None
    _check_args(name, scheme)
    return scheme


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        return f"{where}: {error['msg']}" if where else error["msg"]
    return str(exc)


def _check_args(name: str, scheme: QuantizationScheme) -> None:
    weights, inputs = scheme.weights, scheme.input_activations
    for part, args in (("weights", weights), ("input_activations", inputs)):
        if args is not None and enum_value(args.type) == "float" and args.num_bits != 8:
            raise ValueError(f"config_groups.{name}.{part}: float types are 8-bit (FP8 E4M3) only")
    if enum_value(weights.strategy) not in WEIGHT_STRATEGIES or weights.dynamic:
        raise ValueError(
            f"config_groups.{name}.weights: strategy {enum_value(weights.strategy)!r}"
            f"{' (dynamic)' if weights.dynamic else ''} is not supported; weights use a static "
            f"{', '.join(WEIGHT_STRATEGIES)} strategy"
        )
    if inputs is not None:
        strategy = enum_value(inputs.strategy)
        if strategy not in INPUT_STRATEGIES or (not inputs.dynamic and strategy != "tensor"):
            raise ValueError(
                f"config_groups.{name}.input_activations: strategy {strategy!r} with dynamic="
                f"{inputs.dynamic} is not supported; static input scales are per tensor, dynamic "
                f"ones per {', '.join(INPUT_STRATEGIES)}"
            )


def _packs_zero_points(scheme: QuantizationScheme) -> bool:
    """Whether compressed-tensors would save `scheme` as pack-quantized with packed zero points:
    asymmetric int weights per channel or group, without activation quantization."""
    weights = scheme.weights
    return (
        scheme.input_activations is None
        and enum_value(weights.type) == "int"
        and not weights.symmetric
        and enum_value(weights.strategy) in ("channel", "group")
    )


def stored_scheme(
    scheme: QuantizationScheme, targets: list[str], *, actorder: bool
) -> QuantizationScheme:
    """`scheme` as written on its modules and into config.json: its targets replaced by
    `targets`, its format one that transformers reloads exactly, and `actorder: weight` on the
    weights when GPTQ quantized the columns in activation order."""
    update: dict[str, Any] = {"targets": targets}
    if _packs_zero_points(scheme):
        # compressed-tensors 0.20 packs these zero points 8 to an int32, and transformers
        # 5 then refuses the checkpoint (it expects them unpacked): store one int8 per
        # weight instead, which reloads exactly.
        update["format"] = "naive-quantized"
    if actorder:
        update["weights"] = scheme.weights.model_copy(update={"actorder": "weight"})
    return scheme.model_copy(update=update)


def describe_args(args: QuantizationArgs | None) -> str | None:
    """'int4 group 32 symmetric' style summary of one QuantizationArgs."""
    if args is None:
        return None
    strategy = enum_value(args.strategy)
    text = f"{enum_value(args.type)}{args.num_bits} {strategy}"
    if strategy == "group":
        text += f" {args.group_size}"
    text += " symmetric" if args.symmetric else " asymmetric"
    return text + (" dynamic" if args.dynamic else "")
