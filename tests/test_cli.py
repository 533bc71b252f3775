"""The `chattts-vllm` command, run as a subprocess the way users run it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "chattts_vllm.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    r = cli("make-random-checkpoint", str(root / "asset"), "--num-layers", "2", "--seed", "5",
            "--convert", str(root / "model"))
    assert r.returncode == 0, r.stderr
    return root / "asset", root / "model"


def test_help_lists_the_commands():
    r = cli("--help")
    assert r.returncode == 0
    for name in ("make-random-checkpoint", "convert", "download"):
        assert name in r.stdout


def test_make_random_checkpoint_and_convert(made):
    asset, model = made
    assert json.loads((asset / "gpt" / "config.json").read_text())["num_hidden_layers"] == 2
    assert (asset / "spk_stat.pt").is_file() and (asset / "tokenizer" / "tokenizer.json").is_file()
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["architectures"] == ["ChatTTSForCausalLM"] and cfg["num_hidden_layers"] == 2
    assert (model / "chattts" / "speaker_stats.safetensors").is_file()


def test_convert_command_is_deterministic(made, tmp_path):
    asset, model = made
    r = cli("convert", str(asset), str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert "wrote model" in r.stdout
    assert sha256(tmp_path / "again" / "model.safetensors") == sha256(model / "model.safetensors")


def test_convert_errors_are_messages_not_tracebacks(made, tmp_path):
    r = cli("convert", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert r.returncode == 1
    assert "error:" in r.stderr and "missing" in r.stderr and "Traceback" not in r.stderr
    asset, _ = made
    bare = tmp_path / "bare"
    for p in asset.rglob("*"):
        if p.is_file() and p.name != "spk_stat.pt":
            (bare / p.relative_to(asset)).parent.mkdir(parents=True, exist_ok=True)
            (bare / p.relative_to(asset)).symlink_to(p)
    r = cli("convert", str(bare), str(tmp_path / "out"))
    assert r.returncode == 1 and "--speaker-stats" in r.stderr and "Traceback" not in r.stderr
    r = cli("convert", str(bare), str(tmp_path / "out"), "--speaker-stats", str(asset / "spk_stat.pt"))
    assert r.returncode == 0, r.stderr


def test_download_fails_clearly_without_network(tmp_path):
    t0 = time.monotonic()
    # `.invalid` never resolves; on this machine the real endpoint fails the same way.
    r = cli("download", str(tmp_path / "model"),
            env={"HF_ENDPOINT": "http://hub.invalid", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert time.monotonic() - t0 < 60
    assert r.returncode != 0
    assert "could not download 2Noise/ChatTTS" in r.stderr
    assert "chattts-vllm convert" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "model" / "config.json").exists()


def test_serve_env_spawns_the_engine_core_on_cuda(monkeypatch):
    """On CUDA the engine core is spawned (a forked one inherits the server's CUDA state and
    threads); a user's own start method, and the in-process core, are left alone."""
    from chattts_vllm.serving import cli as serve_cli

    monkeypatch.setattr(serve_cli, "_has_cuda", lambda: True)
    env = serve_cli.serve_env({"PATH": "/bin"})
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert "chattts" in env["VLLM_PLUGINS"]
    assert serve_cli.serve_env({"VLLM_WORKER_MULTIPROC_METHOD": "fork"})["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in serve_cli.serve_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    monkeypatch.setattr(serve_cli, "_has_cuda", lambda: False)
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in serve_cli.serve_env({})
