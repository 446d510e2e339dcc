"""Job options as data: one pydantic model per kind, the single source of defaults and help.

The command line is derived from these models (`reciprune.cli_options`), a recipe stage's
settings (`calibration:` in a oneshot stage, `training:` in a finetune stage) validate against
them, a manifest stores them and a re-run reads them back. A new option is one field here and
the code that uses it.

Field metadata (`json_schema_extra`):
- `flags`: extra spellings of the flag (aliases kept for older command lines);
- `switch`: how a bool appears on the command line: "on" (`--x`, the default for False),
  "off" (`--no-x` only), "both" (`--x/--no-x`);
- `recipe`: False for options that say where or how output is written, which a recipe may not set
  and a re-run does not repeat.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from reciprune.errors import ReciPruneError


def option(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A pydantic Field with its help text and command-line metadata (see the module doc)."""
    constraints = {k: meta.pop(k) for k in ("gt", "ge", "lt", "le") if k in meta}
    return Field(default, description=help, json_schema_extra=meta or None, **constraints)


class Options(BaseModel):
    """Base of every options model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    #: How a bool field without a `switch` appears on the command line.
    default_switch: ClassVar[str] = "on"

    @classmethod
    def field_meta(cls, name: str) -> dict[str, Any]:
        return dict(cls.model_fields[name].json_schema_extra or {})

    @classmethod
    def recipe_fields(cls) -> list[str]:
        """Fields a recipe stage may set."""
        return [n for n in cls.model_fields if cls.field_meta(n).get("recipe", True)]

    def given(self) -> dict[str, Any]:
        """The values set explicitly (by a flag, a recipe or a manifest), JSON-compatible."""
        return self.model_dump(mode="json", include=self.model_fields_set)

    def over(self, base: Options | None) -> Options:
        """These options with `base`'s explicit values under them (what was given here wins)."""
        if base is None:
            return self
        return type(self).model_validate({**base.given(), **self.given()})


class ModelOptions(Options):
    """Which model to load and how."""

    model: str | None = option(
        None,
        "Local Hugging Face folder, .gguf file, or hub id (default: the embedded "
        "SmolLM2-135M-Instruct).",
        recipe=False,
    )
    trust_remote_code: bool = option(
        False, "Allow model code from the model folder / hub to run (off by default).", recipe=False
    )


class ComputeOptions(Options):
    """Where the model computes and in which dtype."""

    device: str = option(
        "auto",
        "Where to compute: auto (the first CUDA device when there is one, else the CPU), cpu, "
        "cuda or cuda:N.",
        metavar="DEVICE",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        "Dtype of the model's weights: auto (the checkpoint's own dtype on a GPU, float32 on the "
        "CPU). Statistics and solves run in float32 whatever it is.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip().lower()):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value.strip().lower()


#: The names `--save-format` accepts (`reciprune.export.formats.choose_format` resolves them).
SaveFormat = Literal["auto", "dense", "sparse-bitmask", "sparse-24-bitmask"]
#: Why the sparse formats are refused: the installed libraries can neither write nor read them.
SPARSE_FORMATS_UNAVAILABLE = (
    "compressed-tensors removed the sparse-bitmask and sparse-24-bitmask compressors in 0.15 "
    "(its ModelCompressor writes an empty sparsity_config) and 0.14, the last with them, needs "
    "transformers < 5, so with transformers 5 a model saved in them would not reload. Use "
    "--save-format auto (or dense): the zeros are stored dense and described in config.json's "
    "sparsity_config; to make a 2:4 model smaller on disk add a quantization scheme (e.g. W4A16, "
    "saved as compressed-tensors pack-quantized)"
)


class SaveOptions(Options):
    """How a stage's weights are written (recipe: a stage's `calibration:` or `training:`)."""

    save_format: SaveFormat = option(
        "auto",
        "Weight format: auto (compressed-tensors' packed formats for quantized modules, dense "
        "otherwise) or dense (quantized modules as dequantized floats). The sparse formats "
        "are refused: compressed-tensors dropped them in 0.15.",
    )

    @field_validator("save_format")
    @classmethod
    def _check_save_format(cls, value: str) -> str:
        if value.startswith("sparse-"):
            raise ValueError(f"{value} is not available: {SPARSE_FORMATS_UNAVAILABLE}")
        return value


class CalibrationOptions(ComputeOptions, SaveOptions):
    """Calibration data of a oneshot stage (recipe: a oneshot stage's `calibration:`)."""

    dataset: str = option(
        "embedded",
        "Calibration data: 'embedded' (packaged Wikipedia passages), a registry name (wikitext, "
        "c4, gsm8k, open_platypus, ultrachat; needs network or cache), a local "
        ".txt/.jsonl/.json/.parquet file, or a saved datasets folder.",
    )
    num_calibration_samples: int = option(64, "Calibration sequences.", gt=0, metavar="N")
    max_seq_length: int = option(
        512, "Tokens per calibration sequence.", gt=0, metavar="N",
        flags=["--calibration-seq-length"],
    )  # fmt: skip
    calibration_batch_size: int = option(
        8, "Sequences per calibration forward: memory vs speed.", gt=0, metavar="N"
    )
    seed: int = option(42, "Seed for data sampling.", metavar="N")
    exact_layer_error: bool = option(
        False,
        "Make the per-layer report's reconstruction error exact for every module: a full XᵀX "
        "per module even for methods that need only column norms (Wanda, DSnoT), which costs "
        "their speed and memory. Without it the error is exact where the method has XᵀX "
        "(SparseGPT, GPTQ) and a diagonal estimate elsewhere.",
    )
    pipeline: str = option(
        "auto",
        "How a oneshot stage walks the model: layerwise (the whole model on the device), "
        "sequential (weights in CPU memory, one decoder layer at a time on the device), "
        "streaming (layers read from the checkpoint's safetensors and written to the output "
        "one at a time: models larger than memory), data_free (modifiers that read only "
        "weights), or auto (data_free when no modifier needs data; else sequential on a GPU, "
        "streaming when the weights would not fit in memory, layerwise otherwise).",
        metavar="NAME",
    )


class PerplexityOptions(Options):
    """Perplexity measured before and after a oneshot or finetune job."""

    eval_ppl: bool = option(
        True, "Measure perplexity on held-out text before and after.", switch="both", recipe=False
    )
    ppl_file: str | None = option(
        None,
        "Held-out text for perplexity (.txt/.jsonl/.json/.parquet); default: embedded held-out "
        "passages, disjoint from the calibration text.",
        recipe=False,
    )
    ppl_samples: int = option(
        16, "Windows of --ppl-seq-length tokens scored for perplexity.", gt=0, metavar="N",
        recipe=False,
    )  # fmt: skip
    ppl_seq_length: int = option(
        512,
        "Tokens per perplexity window: one length for every stage of a run, so the same "
        "checkpoint always reads the same perplexity.",
        gt=1, metavar="N", recipe=False,
    )  # fmt: skip


class OutputOptions(Options):
    """Where and how the result is written; never part of what a re-run repeats."""

    output_dir: Path = option(..., "Where to save the checkpoint.", recipe=False)
    overwrite: bool = option(False, "Replace an existing --output-dir.", recipe=False)
    resume: bool = option(
        False,
        "Continue from the newest checkpoint in OUTPUT_DIR.checkpoints/ (same number of "
        "processes and training arguments).",
        recipe=False,
    )
    progress: bool = option(
        True, "Hide progress bars (e.g. in CI logs).", switch="off", recipe=False
    )


class LaunchOptions(Options):
    """How many training processes to start."""

    nproc_per_node: int | None = option(
        None,
        "Start N training processes on this machine with torchrun (FSDP2: one GPU each on CUDA, "
        "gloo on CPU). For several machines run `torchrun ... -m reciprune finetune ...` "
        "yourself instead.",
        ge=1,
        metavar="N",
        recipe=False,
    )


class EvalOptions(ComputeOptions):
    """`reciprune eval`: what to measure on a saved model."""

    ppl: str | None = option(
        None,
        "Perplexity on FILE (.txt/.jsonl/.json/.parquet), or on the embedded held-out passages "
        "when no FILE is given (the default when no --tasks or --mt-bench-questions).",
        nargs="?", const="embedded", metavar="FILE",
    )  # fmt: skip
    max_seq_length: int = option(512, "Window length in tokens.", gt=0, metavar="N")
    ppl_samples: int = option(16, "Windows scored.", gt=0, metavar="N")
    tasks: str | None = option(
        None,
        "Comma-separated tasks, e.g. piqa,siqa,openbookqa,boolq,asdiv (local, no download) or "
        "lm-eval registry names (lm_eval:piqa, hellaswag, ...). See the list below.",
        metavar="LIST",
    )
    limit: float | None = option(
        None,
        "Evaluate only the first N documents of each task (a value below 1: that fraction); "
        "also caps the MT-Bench questions. Default: all.",
        gt=0, metavar="N",
    )  # fmt: skip
    num_fewshot: int | None = option(
        None,
        "Examples in each prompt (default: 0 for local tasks, the task's own default for "
        "registry tasks). Local examples come from a part of the data that is never scored.",
        ge=0, metavar="K",
    )  # fmt: skip
    batch_size: int = option(8, "Sequences per forward pass.", gt=0, metavar="N")
    max_new_tokens: int | None = option(
        None, "Most tokens generated per answer (default: 128 for asdiv, 512 for MT-Bench).",
        gt=0, metavar="N",
    )  # fmt: skip
    apply_chat_template: bool = option(
        False,
        "Format lm-eval task prompts with the tokenizer's chat template (off by default, as "
        "lm-eval).",
    )
    mt_bench_questions: str | None = option(
        None,
        "Answer the questions of this FastChat-format JSONL file ({question_id, category, "
        "turns}) turn by turn with the chat template, greedily.",
        metavar="FILE",
    )
    mt_bench_answers: str | None = option(
        None,
        "Where to write the MT-Bench answers JSONL (FastChat judge format; default "
        "MODEL/model_answer/MODEL_ID.jsonl when --model is a local folder, required otherwise).",
        metavar="FILE",
    )
    model_id: str | None = option(
        None, "Name of the model in MT-Bench answers (default: the model folder's name)."
    )
    seed: int = option(1234, "Seed for few-shot sampling.", metavar="N")
    output: str | None = option(None, "Also write the results to this JSON file.")
    save_results: bool = option(
        False,
        "Also merge the results into MODEL/eval_results.json (a local model folder), where "
        "`reciprune compare` finds them; tasks evaluated again replace their old entry.",
    )
    progress: bool = option(
        True,
        "Hide reciprune's progress bars (e.g. in CI logs); lm-eval still prints its own.",
        switch="off",
    )


def flag_name(name: str) -> str:
    """The command-line spelling of an option field."""
    return f"--{name.replace('_', '-')}"


def validate_options(
    cls: type[Options], values: dict[str, Any], fix: str = "Fix the flag (see --help)."
) -> Options:
    """`cls` from `values`, or a ReciPruneError naming the flag, what it is and `fix`."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        field = cls.model_fields.get(name)
        what = f" ({field.description.rstrip('.')})" if field and field.description else ""
        raise ReciPruneError(f"{flag_name(name)}{what}: {message}. {fix}") from None

