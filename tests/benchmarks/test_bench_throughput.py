"""benchmarks/bench_throughput.py's engine settings: every share of a split batch runs on a
captured CUDA graph (vLLM runs a batch larger than its largest captured size eagerly)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

from vllm.config import CompilationConfig, VllmConfig

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_throughput.py"


def _bench():
    if str(BENCH.parent) not in sys.path:          # the script imports its sibling bench_common
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def vllm_capture_sizes(max_num_seqs: int, max_capture: int) -> list[int]:
    """The sizes vLLM 0.26 captures for these settings: its own `_set_cudagraph_sizes`, run on a
    stand-in config that holds only the fields the method reads."""
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=False),
        compilation_config=CompilationConfig(max_cudagraph_capture_size=max_capture),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=65536),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        performance_mode="throughput", num_speculative_tokens=0)
    VllmConfig._set_cudagraph_sizes(cfg)
    return cfg.compilation_config.cudagraph_capture_sizes


def test_every_share_has_a_graph():
    bench = _bench()
    shares = {s for b in (1, 64, 256, 512, 1024) for n in (1, 2, 3, 4, 5, 6)
              for s in bench.shares_of(b, n)}
    for share in sorted(shares | {170, 171, 257, 342, 600}):
        size = bench.graph_batch(share)
        captured = vllm_capture_sizes(size, size)
        assert max(captured) >= share, (share, size, captured[-3:])


def test_the_old_setting_left_170_without_a_graph():
    # What the benchmark did before graph_batch: the capture limit equal to the share.
    assert max(vllm_capture_sizes(170, 170)) == 168


def test_summary_gives_each_configuration_its_median_and_extremes():
    bench = _bench()
    rows = [dict(engines=2, batch=512, mps=True, decode="after", repeat=i, gpt_audio_s_per_s=g,
                 e2e_audio_s_per_s=e) for i, (g, e) in enumerate([(1500, 1400), (1200, 1100), (1300, 1250)])]
    rows.append(dict(engines=2, batch=1024, mps=True, decode="after", gpt_audio_s_per_s=1600,
                     e2e_audio_s_per_s=1550))
    (s512,), (s1024,) = ([s for s in bench.summarize(rows) if s["batch"] == b] for b in (512, 1024))
    assert (s512["rounds"], s512["e2e_median"], s512["e2e_worst"], s512["e2e_best"]) == (3, 1250, 1100, 1400)
    assert (s512["gpt_median"], s512["gpt_best"]) == (1300, 1500)
    assert (s1024["rounds"], s1024["e2e_median"]) == (1, 1550)


def test_core_choice_sets_the_children_environment():
    bench = _bench()
    assert bench.in_process(bench.child_env(False, None, "inproc"))
    assert not bench.in_process(bench.child_env(False, None, "own"))


def test_a_repeated_sweep_row_is_its_median_round_with_every_rate():
    bench = _bench()
    rounds = [dict(batch=512, repeat=i, gpt_audio_s_per_s=g, e2e_audio_s_per_s=e, gpt_s=t)
              for i, (g, e, t) in enumerate([(900, 850, 5.0), (1100, 1000, 4.1), (1000, 930, 4.5)])]
    (mid,) = bench.median_round(rounds)
    assert (mid["gpt_audio_s_per_s"], mid["e2e_audio_s_per_s"], mid["gpt_s"]) == (1000, 930, 4.5)
    assert mid["gpt_rounds_audio_s_per_s"] == [900, 1100, 1000]
    assert mid["e2e_rounds_audio_s_per_s"] == [850, 1000, 930]
    (low,) = bench.median_round(rounds[:2])              # even count: the lower middle, a real round
    assert low["gpt_audio_s_per_s"] == 900
    assert bench.median_round(rounds[:1]) == rounds[:1] and bench.median_round([]) == []


def test_cuda_memory_counters_are_differenced_per_round():
    bench = _bench()
    assert bench.cuda_memory_counters(False) == {} and bench.cuda_memory_delta({}, {}) == {}
    before = dict(device_allocs=10, device_frees=4, alloc_retries=0, free_gib=20.123)
    after = dict(device_allocs=480, device_frees=474, alloc_retries=2, free_gib=0.5)
    assert bench.cuda_memory_delta(before, after) == dict(device_allocs=470, device_frees=470,
                                                          alloc_retries=2, free_gib_at_start=20.12)


def test_gc_timer_counts_the_collections_in_its_block():
    import gc

    bench = _bench()
    with bench.GcTimer() as t:
        gc.collect()
        gc.collect()
    s = t.summary()
    assert s["collections"] == 2 and s["total_ms"] >= s["longest_ms"] >= 0
    gc.collect()
    assert t.summary()["collections"] == 2                  # nothing counted after the block
