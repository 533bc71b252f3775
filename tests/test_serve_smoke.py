"""`vllm serve DIR` starts with the plugin installed and answers a plain /v1/completions call."""
from __future__ import annotations

import os
import sys

import pytest
import requests

from tests.live_server import free_port, live_server

pytestmark = pytest.mark.slow


def test_vllm_serve_completions_smoke(model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")
    argv = [vllm_bin, "serve", str(model_dir), "--port", str(port), "--dtype", "float32",
            "--max-model-len", "512", "--enforce-eager", "--served-model-name", "chattts"]
    url = f"http://127.0.0.1:{port}"
    with live_server(argv, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, log, f"{url}/health"):
        models = requests.get(f"{url}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "chattts"
        r = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": "chattts", "prompt": [21134, 872, 1962, 21135], "max_tokens": 4,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert "ChatTTSForCausalLM" in log.read_text(errors="replace")
