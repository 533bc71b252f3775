"""A local Ray cluster (2 logical CPUs, no dashboard) shared by the Ray tests, and a 2-layer random
checkpoint. Engines start inside Ray actors: ~45-80 s each on 2 shared cores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SR = 24000
ENGINE_KWARGS = dict(dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=64)


@pytest.fixture(scope="session")
def ray_model_dir(tmp_path_factory) -> Path:
    from chattts_vllm.checkpoint import convert, write_random_asset
    from tests.conftest import sharpen_heads

    root = tmp_path_factory.mktemp("ray-model")
    write_random_asset(root / "asset", num_layers=2, seed=5)
    sharpen_heads(root / "asset")
    return convert(root / "asset", root / "model")


@pytest.fixture(scope="session")
def ray_cluster():
    """Workers inherit this process's environment (VLLM_CPU_KVCACHE_SPACE, ...)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
