"""`vllm serve DIR` starts with the plugin installed and answers a plain /v1/completions call."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_completions_smoke(model_dir, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")
    proc = subprocess.Popen(
        [vllm_bin, "serve", str(model_dir), "--port", str(port), "--dtype", "float32",
         "--max-model-len", "512", "--enforce-eager", "--served-model-name", "chattts"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("server did not become healthy in 300 s")
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "chattts"
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "model": "chattts", "prompt": [21134, 872, 1962, 21135], "max_tokens": 4,
            "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 4
        log.seek(0)
        text = log.read()
        assert "ChatTTSForCausalLM" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
