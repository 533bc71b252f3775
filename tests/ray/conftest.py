"""A local Ray cluster (2 logical CPUs, no dashboard) shared by the Ray tests, and a 2-layer random
checkpoint (the serving tests' fixture). Engines start inside Ray actors: ~45-80 s each on 2 shared cores."""
from __future__ import annotations

import os

import pytest

from tests.serving.conftest import SR, serving_model_dir  # noqa: F401  (2 layers, heads sharpened)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_KWARGS = dict(dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=64)


@pytest.fixture(scope="session")
def ray_cluster():
    """Workers inherit this process's environment (VLLM_CPU_KVCACHE_SPACE, ...)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
