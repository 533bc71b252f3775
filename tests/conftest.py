"""Session fixtures: one full-size random checkpoint in the official layout, converted once, and
one CPU vLLM engine on it shared by the engine tests (starting an engine costs ~45 s here)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=32, enforce_eager=True)


def boost_eos(asset_dir, factor: float = 1.6) -> None:
    """Scales head_code's EOS rows so random weights end utterances at varied, testable steps."""
    path = os.path.join(asset_dir, "Embed.safetensors")
    sd = load_file(path)
    for k in range(4):
        sd[f"head_code.{k}.parametrizations.weight.original0"][625] *= factor
    save_file(sd, path)


@pytest.fixture(scope="session")
def asset_dir(tmp_path_factory):
    from chattts_vllm.checkpoint import write_random_asset

    d = tmp_path_factory.mktemp("asset")
    write_random_asset(d, seed=0)
    boost_eos(d)
    return d


@pytest.fixture(scope="session")
def model_dir(asset_dir, tmp_path_factory):
    from chattts_vllm.checkpoint import convert

    return convert(asset_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def engine(model_dir):
    from chattts_vllm.synthesize import ChatTTS

    torch.set_num_threads(max(1, torch.get_num_threads()))
    eng = ChatTTS(model_dir, **ENGINE_ARGS)
    yield eng
    del eng
