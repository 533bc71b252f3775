"""Where a GPT step's time goes on the GPU: host profile of the in-process engine at one batch.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/profile_gpt_step.py --batch 512 --frames 200

Runs the ChatTTS engine (or `--stock`, the same-shape Llama) on random full-size weights, warms
up, then generates one batch under cProfile (main thread: scheduler, runner, sampler glue, output
processing) and torch.profiler (GPU kernel time). Prints ms per step, GPU-busy ms per step and the
top host functions by own time. A diagnosis tool for the throughput work, not a benchmark.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import FPS, make_stock_llama  # noqa: E402


def engine_kwargs(batch: int, dtype: str) -> dict:
    """The throughput benchmark's sweep settings."""
    return dict(dtype=dtype, max_model_len=1024, enable_prefix_caching=False, max_num_seqs=batch,
                gpu_memory_utilization=0.85, max_num_batched_tokens=65536,
                compilation_config={"max_cudagraph_capture_size": max(512, batch)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--stock", action="store_true")
    p.add_argument("--model")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    tmp = Path(tempfile.mkdtemp())
    b, frames = args.batch, args.frames
    if args.stock:
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model or make_stock_llama(tmp / "llama", 20), skip_tokenizer_init=True,
                  **engine_kwargs(b, "bfloat16"))
        sp = SamplingParams(temperature=0.3, top_p=0.7, top_k=20, repetition_penalty=1.05,
                            max_tokens=frames, min_tokens=frames, ignore_eos=True, detokenize=False)
        prompts = [{"prompt_token_ids": list(range(20))} for _ in range(b)]

        def run():
            return llm.generate(prompts, sp, use_tqdm=False)
    else:
        from chattts_vllm.checkpoint import convert, write_random_asset
        from chattts_vllm.params import InferCodeParams
        from chattts_vllm.synthesize import ChatTTS

        model = args.model
        if model is None:
            write_random_asset(tmp / "asset", seed=0)
            model = str(convert(tmp / "asset", tmp / "model"))
        tts = ChatTTS(model, **engine_kwargs(b, "bfloat16"))
        texts = [f"utterance {i} of the profile run." for i in range(b)]
        ps = [InferCodeParams(manual_seed=i, min_new_token=frames, max_new_token=frames) for i in range(b)]

        def run():
            return tts.infer_code(texts, ps, use_tqdm=False)
    run()  # warm-up at full batch
    t0 = time.perf_counter()
    run()
    plain = time.perf_counter() - t0
    prof = cProfile.Profile()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as tp:
        t0 = time.perf_counter()
        prof.enable()
        run()
        prof.disable()
        profiled = time.perf_counter() - t0
    gpu_us = sum(e.self_device_time_total for e in tp.key_averages())
    print(f"\n== {'stock' if args.stock else 'chattts'} batch {b} frames {frames}: "
          f"{plain / frames * 1e3:.2f} ms/step plain ({b * frames / FPS / plain:.0f} audio-s/s), "
          f"{profiled / frames * 1e3:.2f} ms/step profiled, GPU kernels {gpu_us / 1e3 / frames:.2f} ms/step")
    print(tp.key_averages().table(sort_by="self_device_time_total", row_limit=15))
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print(s.getvalue()[:12000])


if __name__ == "__main__":
    main()
