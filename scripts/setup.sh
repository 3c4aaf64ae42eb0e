#!/usr/bin/env bash
# Set up lmi-compile on a fresh machine and run the main job on a generated tiny example.
# Usage: bash scripts/setup.sh [--no-example]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# LMI containers bring their own torch; on a bare machine install a CPU build (TORCH_SPEC) rather than
# letting pip pull a multi-GB CUDA build through a dependency.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
[ "${1:-}" = "--no-example" ] && exit 0

# The main job on a generated tiny Llama, as far as this machine allows: engines need TensorRT-LLM on a
# GPU and NEFFs the Neuron SDK, so the TensorRT-LLM job stops after convert and the Neuron job after split.
.venv/bin/python scripts/make_tiny_model.py examples/tiny-llama
.venv/bin/lmi-compile plan examples/tiny-llama --tp 2 --instance ml.g5.12xlarge
.venv/bin/lmi-compile trtllm examples/tiny-llama --tp 2 --pp 2 --work-dir examples/work-trtllm --until convert
.venv/bin/lmi-compile neuron examples/tiny-llama --tp 2 --n-positions 256 --work-dir examples/work-neuron --until split
.venv/bin/lmi-compile check examples/tiny-llama
echo "setup done: rank files in examples/work-trtllm/checkpoint, split weights in examples/work-neuron/split"
