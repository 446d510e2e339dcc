#!/usr/bin/env bash
# Download (here, with PyPI) the wheels a GPU machine's Python 3.12 image lacks for reciprune,
# into .whl/ (git-ignored), for `benchmarks/gpu_check.sh` there: see shared/GPU.md and the device
# tool's README. The image has torch, transformers, accelerate, peft, safetensors, tokenizers,
# numpy, pyarrow, matplotlib, psutil and tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1 \
  datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18 xxhash==3.5.0 loguru==0.7.3 gguf==0.17.1 \
  compressed-tensors==0.20.1 pyyaml==6.0.2
ls .whl | wc -l
du -sh .whl
