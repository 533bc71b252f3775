"""Session fixtures: one full-size random checkpoint in the official layout, converted once, and
one CPU vLLM engine on it shared by the engine tests (starting an engine costs ~45 s here)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, max_num_seqs=32, enforce_eager=True)


def sharpen_heads(asset_dir, eos_factor: float = 1.6, text_factor: float = 20.0) -> None:
    """Makes random weights behave like a trained model where the tests need it.

    head_code's EOS rows are scaled so utterances end on their own at varied steps; head_text is
    scaled so its 21,178 logits are spread like a trained head's. (With near-flat random logits the
    top two candidates are often within 1e-4, and at temperature 1e-4 such a near-tie is a coin
    flip for both upstream's and our sampler, so ids could not be compared.)
    """
    path = os.path.join(asset_dir, "Embed.safetensors")
    sd = load_file(path)
    for k in range(4):
        sd[f"head_code.{k}.parametrizations.weight.original0"][625] *= eos_factor
    sd["head_text.parametrizations.weight.original0"] *= text_factor
    save_file(sd, path)


@pytest.fixture(scope="session")
def asset_dir(tmp_path_factory):
    from chattts_vllm.checkpoint import write_random_asset

    d = tmp_path_factory.mktemp("asset")
    write_random_asset(d, seed=0)
    sharpen_heads(d)
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
