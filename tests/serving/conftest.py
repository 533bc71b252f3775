"""One live `vllm serve` with the speech endpoint, shared by every serving test (a start costs ~45 s).

The server runs a 2-layer random checkpoint (official layout, converted), with its own frame
directory so the tests can see exactly which side-channel files it leaves behind.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import requests
import soundfile as sf

from tests.live_server import free_port, live_server

MODEL = "chattts"
SR = 24000
# The console script, as users run it (`python -m chattts_vllm.cli` sees only the built-in commands:
# the registry then lives in __main__, not in the chattts_vllm.cli module the others register in).
CLI = str(Path(sys.executable).with_name("chattts-vllm"))


def metric(url: str, name: str) -> float:
    """A series of the server's /metrics, summed over its labels (or one exact labelled series)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@dataclass
class Server:
    url: str
    model_dir: Path
    frame_dir: Path
    log: Path
    timeline_dir: Path | None = None

    def speech(self, **body) -> requests.Response:
        return requests.post(f"{self.url}/v1/audio/speech", json={"model": MODEL, **body}, timeout=300)

    def metric(self, name: str) -> float:
        return metric(self.url, name)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory) -> Path:
    from chattts_vllm.checkpoint import convert, write_random_asset
    from tests.conftest import sharpen_heads

    root = tmp_path_factory.mktemp("serving")
    write_random_asset(root / "asset", num_layers=2, seed=3)
    sharpen_heads(root / "asset")           # utterances end on their own after a few frames
    return convert(root / "asset", root / "model")


def cpu_serve_command(model_dir: Path, root: Path, *extra: str) -> tuple[list[str], dict, int]:
    """(argv, env, port) of `chattts-vllm serve DIR` on the CPU test machine, frames under
    root/frames; the wrapper sets VLLM_PLUGINS and execs `vllm serve`."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CHATTTS_VLLM_FRAME_DIR": str(root / "frames"),
           "CHATTTS_VLLM_AUDIO_THREADS": "2"}
    env.pop("VLLM_PLUGINS", None)
    argv = [CLI, "serve", str(model_dir), "--port", str(port), "--dtype", "float32",
            "--max-model-len", "1024", "--enforce-eager", "--served-model-name", MODEL, *extra]
    return argv, env, port


@pytest.fixture(scope="session")
def server(serving_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    argv, env, port = cpu_serve_command(serving_model_dir, root, "--max-num-seqs", "64",
                                        "--enable-log-requests", "--max-log-len", "8")
    env["CHATTTS_VLLM_TIMELINE"] = str(root / "timeline")       # chattts_vllm/timeline.py
    srv = Server(f"http://127.0.0.1:{port}", serving_model_dir, root / "frames", root / "serve.log",
                 root / "timeline")
    with live_server(argv, env, srv.log, f"{srv.url}/health"):
        yield srv


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Any response format -> (float32 mono samples, sample rate)."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767, SR
    try:                                # libsndfile reads Ogg Opus at its own rate (24 kHz)
        y, sr = sf.read(io.BytesIO(data), dtype="float32")
        return (y if y.ndim == 1 else y[:, 0]), sr
    except sf.LibsndfileError:          # streamed FLAC/WAV without total length
        pass
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        parts = [f.to_ndarray().reshape(-1)[: f.samples] for f in c.decode(stream)]
        y = np.concatenate(parts)
        if y.dtype.kind == "i":
            y = y / float(np.iinfo(y.dtype).max + 1)
        return y.astype(np.float32), stream.rate
