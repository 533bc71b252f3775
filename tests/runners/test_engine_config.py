"""The ChatTTS per-architecture config hook (runners/engine_config.py): on model runner V2 the
CUDA graphs reach prefill-sized steps unless the user chose the sizes; prefix caching is off."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.config import CompilationConfig, VllmConfig

from chattts_vllm.runners import engine_config
from chattts_vllm.runners.engine_config import PREFILL_GRAPH_TOKENS, ChatTTSEngineConfig


def _config(max_num_seqs: int = 128, batched: int = 8192, **compilation) -> SimpleNamespace:
    """A stand-in VllmConfig holding the fields the hook and vLLM's `_set_cudagraph_sizes` read."""
    return SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=False, logits_processors=None),
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        compilation_config=CompilationConfig(**compilation),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=batched),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        performance_mode="throughput", num_speculative_tokens=0)


def _sizes(cfg) -> list[int]:
    ChatTTSEngineConfig.verify_and_update_config(cfg)
    VllmConfig._set_cudagraph_sizes(cfg)
    return cfg.compilation_config.cudagraph_capture_sizes


@pytest.fixture
def runner_v2(monkeypatch):
    monkeypatch.setattr(engine_config, "uses_v1_runner", lambda: False)


def test_v2_graphs_reach_a_burst_of_prefills(runner_v2):
    sizes = _sizes(_config())
    assert max(sizes) == PREFILL_GRAPH_TOKENS and 1408 in sizes      # a 64-stream burst's step
    assert [s for s in sizes if s <= 256] == [1, 2, 4] + list(range(8, 257, 8))   # as before


def test_the_token_budget_and_the_users_sizes_win(runner_v2):
    assert max(_sizes(_config(batched=1024))) == 1024
    assert max(_sizes(_config(max_cudagraph_capture_size=256))) == 256
    assert _sizes(_config(cudagraph_capture_sizes=[1, 8, 64])) == [1, 8, 64]


def test_v1_runner_keeps_vllms_default_and_gets_the_sampler(monkeypatch):
    monkeypatch.setattr(engine_config, "uses_v1_runner", lambda: True)
    cfg = _config()
    assert max(_sizes(cfg)) == 256                       # min(2 x max_num_seqs, 512)
    assert cfg.model_config.logits_processors == [engine_config.V1_SAMPLER]
    assert cfg.cache_config.enable_prefix_caching is False
