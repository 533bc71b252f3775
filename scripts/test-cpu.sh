#!/usr/bin/env bash
# The test command of the README: every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CHATTTS_VENV:-.venv}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$venv/bin/python" -m pytest -m "not gpu" -q tests "$@"
