"""Where a GPT step's time goes on the GPU: host profile of the in-process engine at one batch.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/profile_gpt_step.py --batch 512 --frames 200

Runs the ChatTTS engine (or `--stock`, the same-shape Llama) on random full-size weights, warms
up, then generates one batch: plain (ms per step), again at a third of the length (the two split
the time into ms per step and a fixed cost per batch: arrivals, prefill, collecting results),
under a stack sampler (every thread's Python stack every `--interval` ms: where host time goes, by
area, with little distortion), and under torch.profiler (GPU kernel time per step) plus, with `--cprofile`, cProfile (exact call
counts, but it slows Python ~3x). A diagnosis tool for the throughput work, not a benchmark; run it
for both engines in one call to compare their host split:

    for e in "" --stock; do VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/profile_gpt_step.py $e; done
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
from bench_throughput import (DECODE_CHUNK, FPS, chunk_sizes, make_stock_llama,  # noqa: E402
                              warm_decoder)

from chattts_vllm.stack_sampler import StackSampler  # noqa: E402


_CUDA = os.path.exists("/dev/nvidia0")   # the engine's memory fraction is of host RAM on CPU


def engine_kwargs(batch: int, dtype: str) -> dict:
    """The throughput benchmark's sweep settings (its engine holds up to 512 sequences whatever
    the batch: max_num_seqs 1 with graphs captured up to 512 crashed stock vLLM and ChatTTS alike
    with an illegal memory access on the H100)."""
    return dict(dtype=dtype, max_model_len=1024, enable_prefix_caching=False,
                max_num_seqs=max(512, batch),
                gpu_memory_utilization=0.85 if _CUDA else 0.3, max_num_batched_tokens=65536,
                compilation_config={"max_cudagraph_capture_size": max(512, batch)})


def _raw_generate(tts, texts: list[str], n: int) -> float:
    """The engine alone: the same requests through `LLM.generate`, frames written but not read."""
    from chattts_vllm.gpt.requests import code_request
    from chattts_vllm.params import InferCodeParams
    from chattts_vllm.runners.outputs import FrameReader

    reqs = [code_request(tts.tokenizer, t, InferCodeParams(manual_seed=i, min_new_token=n,
                                                           max_new_token=n),
                         max_model_len=tts.max_model_len) for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    tts.llm.generate([r.prompt for r in reqs], [r.sampling_params for r in reqs], use_tqdm=False)
    took = time.perf_counter() - t0
    for r in reqs:
        FrameReader(r.sink).close()
    return took


def _no_export(fn):
    """Run `fn` with the sampler's per-step record export (D2H copy + sink thread) switched off."""
    from chattts_vllm.runners import mrv2

    def wrapped(*a):
        saved = mrv2.ChatTTSSampler._export
        mrv2.ChatTTSSampler._export = lambda self, input_batch, records: None
        try:
            return fn(*a)
        finally:
            mrv2.ChatTTSSampler._export = saved
    return wrapped


def _switch(ms: float, fn):
    def wrapped(*a):
        saved = sys.getswitchinterval()
        sys.setswitchinterval(ms / 1e3)
        try:
            return fn(*a)
        finally:
            sys.setswitchinterval(saved)
    return wrapped


# Diagnosis variants: which part of the ChatTTS step costs host time (GIL hand-offs with the sink
# thread, the export, reading the frames back) against the full `infer_code`.
VARIANTS = {
    "raw": _raw_generate,
    "noexport": _no_export(_raw_generate),
    "raw-switch1": _switch(1, _raw_generate),
    "raw-switch20": _switch(20, _raw_generate),
}


def time_variant(name: str, tts, texts: list[str], frames: int) -> None:
    fn = VARIANTS[name]
    short = max(1, frames // 3)
    full, part = fn(tts, texts, frames), fn(tts, texts, short)
    slope = (full - part) / (frames - short)
    print(f"== variant {name}: {full / frames * 1e3:.2f} ms/step plain, split {slope * 1e3:.2f} ms "
          f"per step + {(full - slope * frames) * 1e3:.0f} ms per batch", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--stock", action="store_true")
    p.add_argument("--model")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--interval", type=float, default=0.5, help="stack sampler period, ms")
    p.add_argument("--cprofile", action="store_true", help="also run under cProfile")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="ChatTTS only: also time these variants of the step (plain and split only)")
    p.add_argument("--quick", action="store_true", help="plain and split timings only (no profilers)")
    p.add_argument("--with-audio", action="store_true",
                   help="ChatTTS only: load the audio models on the GPU and warm the decoder for every "
                        "chunk shape first, as the throughput benchmark's engine process does")
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    tmp = Path(tempfile.mkdtemp())
    b, frames = args.batch, args.frames
    if args.stock:
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model or make_stock_llama(tmp / "llama", 20), skip_tokenizer_init=True,
                  **engine_kwargs(b, "bfloat16"))
        prompts = [{"prompt_token_ids": list(range(20))} for _ in range(b)]

        def run(n: int = frames):
            sp = SamplingParams(temperature=0.3, top_p=0.7, top_k=20, repetition_penalty=1.05,
                                max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
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
        if args.with_audio:
            # The benchmark's engine stepped at 12.6-14.6 ms where this script's stepped at ~7.5
            # (2026-11-29); its process also holds the audio models and the decoder's buffers.
            import torch

            from chattts_vllm.audio.checkpoint import load_audio_models

            cuda = torch.cuda.is_available()
            audio = load_audio_models(model, device="cuda" if cuda else "cpu",
                                      dtype=torch.bfloat16 if cuda else torch.float32)
            warm_decoder(audio, chunk_sizes(b, DECODE_CHUNK), frames, cuda)
            if cuda:
                free, total = torch.cuda.mem_get_info()
                print(f"== audio models loaded, decoder warmed: {free / 2**30:.1f} of "
                      f"{total / 2**30:.0f} GiB free", flush=True)

        def run(n: int = frames):
            ps = [InferCodeParams(manual_seed=i, min_new_token=n, max_new_token=n) for i in range(b)]
            return tts.infer_code(texts, ps, use_tqdm=False)
    run()  # warm-up at full batch
    if not args.stock:
        for v in args.variants:
            time_variant(v, tts, texts, frames)
    t0 = time.perf_counter()
    run()
    plain = time.perf_counter() - t0
    # Two lengths split the batch's time into a per-step slope and a fixed part (arrivals, the
    # first step's prefill, collecting results): a fixed cost spread over few steps otherwise
    # looks like per-step overhead.
    short = max(1, frames // 3)
    t0 = time.perf_counter()
    run(short)
    t_short = time.perf_counter() - t0
    slope = (plain - t_short) / (frames - short) if frames > short else float("nan")
    fixed = plain - slope * frames
    name = "stock" if args.stock else ("chattts+audio" if args.with_audio else "chattts")
    if args.quick:
        print(f"== {name} batch {b} frames {frames}: {plain / frames * 1e3:.2f} ms/step plain, split "
              f"{slope * 1e3:.2f} ms per step + {fixed * 1e3:.0f} ms per batch", flush=True)
        return
    sampler = StackSampler(args.interval / 1e3)
    t0 = time.perf_counter()
    with sampler:
        run()
    sampled = time.perf_counter() - t0
    from torch.profiler import ProfilerActivity, profile
    import torch
    cuda = torch.cuda.is_available()      # on a CPU machine the table is CPU op time (a smoke run)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as tp:
        run()
    gpu_us = sum((e.self_device_time_total if cuda else e.self_cpu_time_total) for e in tp.key_averages())
    print(f"\n== {name} batch {b} frames {frames}: {plain / frames * 1e3:.2f} ms/step plain "
          f"({b * frames / FPS / plain:.0f} audio-s/s), {sampled / frames * 1e3:.2f} ms/step sampled, "
          f"{'GPU kernels' if cuda else 'CPU ops'} {gpu_us / 1e3 / frames:.2f} ms/step")
    print(f"== {name} split from {short} and {frames} frames: {slope * 1e3:.2f} ms per step + "
          f"{fixed * 1e3:.0f} ms per batch of {b} ({fixed / b * 1e3:.2f} ms per request)")
    print(tp.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                  row_limit=15))
    sampler.report(frames, args.top)
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        run()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(s.getvalue()[:12000])


if __name__ == "__main__":
    main()
