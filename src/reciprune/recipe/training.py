"""Training arguments of a finetune stage: in the recipe (`training:`) and on the command line.

A checked-in recipe carries the hyperparameters its paper used, so `reciprune run` reproduces it;
flags given to `reciprune finetune` override the recipe's values for that run.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from reciprune.recipe.options import SaveOptions


class TrainingConfig(SaveOptions):
    """The options users know from Hugging Face TrainingArguments and the SparseML tutorials."""

    default_switch: ClassVar[str] = "both"

    dataset: str | None = Field(
        None,
        description="Training data: 'embedded' (packaged Wikipedia passages), 'asdiv' (packaged "
        "math word problems), a registry name (gsm8k, open_platypus, ultrachat, wikitext, c4), a "
        "local .txt/.jsonl/.json/.parquet/.csv file or a save_to_disk folder.",
    )
    data_format: str = Field(
        "auto",
        description="Row layout: auto, raw_text, question_answer, alpaca, chat, "
        "prompt_completion or pretokenized.",
    )
    text_field: str | None = Field(None, description="Column holding raw text (forces raw text).")
    response_only: bool = Field(
        True, description="Instruction rows: take the loss on response tokens only."
    )
    packing: bool = Field(
        False, description="Concatenate rows and cut full sequences of max_seq_length tokens."
    )
    max_train_samples: int | None = Field(
        None, gt=0, description="Use at most this many training examples (seeded choice)."
    )
    eval_samples: int = Field(
        32, ge=0, description="Examples held out of the training data for the eval loss."
    )
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(
        -1, description="Optimizer steps to run; overrides num_train_epochs when > 0."
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step on each process."
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Sequences per optimizer step over all processes; when set, "
        "gradient_accumulation_steps is derived from it.",
    )
    max_seq_length: int = Field(512, ge=2, description="Tokens per training sequence.")
    precision: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Compute precision: auto = bfloat16 on CUDA, float32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    seed: int = Field(42, description="Seed for data order, dropout and initialisation.")
    save_steps: int = Field(
        0, ge=0, description="Write a resumable checkpoint every this many steps (0 = never)."
    )
    eval_steps: int = Field(
        0, ge=0, description="Measure the held-out loss every this many steps (0 = at the end)."
    )
    logging_steps: int = Field(
        10,
        gt=0,
        description="Read the loss and metrics off the device every this many steps (one "
        "synchronisation each; the loss curve still has every step).",
    )
    distill_teacher: str | None = Field(
        None,
        description="Teacher for distillation modifiers: a model path, 'self' (a frozen copy of "
        "the stage's starting model), 'base' (the model the run started from: in `reciprune "
        "run` the --model before any stage, e.g. the dense model a sparse stage was pruned from; "
        "in `reciprune finetune` the same as 'self'), or in `reciprune run` 'stage:NAME' (that "
        "stage's output).",
    )

    load_in_4bit: bool = Field(
        False,
        description="QLoRA-style 4-bit base: store the frozen Linear weights of the decoder "
        "layers as NF4 (blocks of 64 with an absmax each) while adapters or deltas train in "
        "full precision; the checkpoint saved is the dequantized base with them merged. One "
        "process only.",
    )
    bnb_4bit_use_double_quant: bool = Field(
        False,
        description="With load_in_4bit: also quantize the block constants to 8 bits (QLoRA's "
        "double quantization).",
    )
    quant_backend: Literal["auto", "bitsandbytes", "reciprune"] = Field(
        "auto",
        description="With load_in_4bit, who computes NF4: bitsandbytes, reciprune (its own "
        "torch NF4, the same values) or auto (bitsandbytes when it runs here, else reciprune).",
    )

    @field_validator("bnb_4bit_use_double_quant", "quant_backend")
    @classmethod
    def _needs_4bit(cls, value: object, info: ValidationInfo) -> object:
        if value not in (False, "auto") and not info.data.get("load_in_4bit"):
            raise ValueError(
                f"{info.field_name}={value} only applies to a 4-bit base: add load_in_4bit "
                "(--load-in-4bit), or drop it"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be a positive number of steps, or -1 for epochs")
        return self
