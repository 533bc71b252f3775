"""Offline throughput of ChatTTS on vLLM: 10 s utterances (470 frames) at several batch sizes.

Sweep (default): GPT only (frames/s and audio-s/s, codes and hidden states delivered to the caller),
end to end (GPT, then Decoder + Vocos on the same GPU, audio copied to host memory) and stock vLLM
on a same-shape Llama (20 layers, hidden 768, vocab 626, one head) as the ceiling, all in the same
run. Both engines get the same tuning: CUDA graphs up to the largest batch (at least 512),
`max_num_batched_tokens` 65,536, `gpu_memory_utilization` 0.85. Each engine runs in its own
subprocess (engine core in-process unless `--core own`; the JSON's `engine_core` says which) so
that GPU memory is returned between them.

    python benchmarks/bench_throughput.py [--batches 1 64 256 512 1024] [--frames 470]

Several engines per GPU: `--engines 1 2 3 4 --batches 512` starts max(N) ChatTTS engine processes
on the one GPU, one after the other (engine k sized for the largest share it will get, KV cache set
with `kv_cache_memory_bytes`), warms each up (GPT and the Decoder's Triton kernels, for every shape
it will see), then runs one round per (N, batch): the first N engines each take their share of the
batch, start together at a barrier and each decodes its own outputs; the round's wall time runs
from the barrier to the last engine's end. Where the engines for all rounds do not fit in memory,
each N gets its own set of processes. Rows go to the `engines` section; `best_config` is the best
end-to-end row of either section.

Levers: `--kv-cache-dtype fp8` (both ChatTTS and stock; sweep rows then go to `variants`), `--mps`
(run the engines under an NVIDIA MPS daemon started and stopped by this script), `--pin-cores`
(engine k on the k-th slice of the cores: the 2-engine GPT times of 2026-11-29 were up to 40 %
apart within a round), `--core own` (each engine's core in its own process, vLLM's default, so the
core's step loop does not also turn outputs into results; `inproc`, the default here, keeps the
numbers comparable with earlier rows), `--repeats N` (every round N times on the same engines; the
JSON's `summary` gives each configuration's median and best; a sweep row is its median round, and
stock's rate the median of its N), `--decode`: `after`
(the Decoder + Vocos pass once the GPT is done, as `decode_utterances`), `overlap` (decoded while
the GPT generates, serving/overlap.py, as `ChatTTS.synthesize(overlap_decode=True)` does) or `both` (each round
runs twice; overlap rows carry `decode: "overlap"`, and sweep rows `e2e_overlap_audio_s_per_s`).

Writes (merges into) benchmarks/results/throughput-<card>-<date>[-tag].json and a plot; prints a
short table last. `--smoke` runs a tiny CPU-sized version (2 layers, 16 frames) of the same code.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common

from chattts_vllm.serving.colocate import core_slice, pin_process

FPS = 46.875
SAMPLE_RATE = 24000
RESULTS = Path(__file__).resolve().parent / "results"
DECODE_CHUNK = 64
BLOCK = 16                       # KV-cache block size (tokens)
OVERHEAD_GIB = 5.0               # per engine besides its KV cache: weights, activations, graphs, audio
TEXT = "utterance {} of the throughput benchmark, ten seconds long."


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_info() -> tuple[str, float]:
    """(card name with dashes, total GiB)."""
    name, gib = bench_common.gpu_info()
    return name.replace(" ", "-"), gib


# -- the work of one engine process ----------------------------------------------------------------

def requests_for(start: int, n: int, frames: int):
    from chattts_vllm.params import InferCodeParams

    texts = [TEXT.format(i) for i in range(start, start + n)]
    ps = [InferCodeParams(manual_seed=i, min_new_token=frames, max_new_token=frames)
          for i in range(start, start + n)]
    return texts, ps


def chunk_sizes(share: int, size: int) -> set[int]:
    """Batch sizes of `share` utterances cut into chunks of `size` (the decode's calls, or the
    overlap's lockstep groups)."""
    return {min(size, share - i) for i in range(0, share, size)}


def decode(audio, frames: list[tuple], cuda: bool) -> int:
    """Decoder + Vocos on all utterances, as `ChatTTS.synthesize` decodes them (equal lengths in
    batched calls of DECODE_CHUNK); the audio ends in host memory. Returns samples."""
    import torch

    from chattts_vllm.serving.pipeline import decode_utterances

    wavs = decode_utterances(audio, frames, max_batch=DECODE_CHUNK)
    if cuda:
        torch.cuda.synchronize()
    return sum(len(w) for w in wavs)


def warm_decoder(audio, shapes: set[int], frames: int, cuda: bool) -> None:
    """Triton JIT / autotuning for every (chunk, frames) shape that a timed decode will use."""
    import numpy as np

    from chattts_vllm.audio.convnext import triton_kernels

    rng = np.random.default_rng(0)
    codes = np.zeros((frames, 4), np.int32)
    for b in sorted(shapes):
        decode(audio, [(codes, rng.standard_normal((frames, 768), dtype=np.float32))
                       for _ in range(b)], cuda)
    triton_kernels("tune_cache").save()          # the picks on disk: the next process skips tuning


def wait_file(path: Path, deadline: float | None = None) -> str:
    while not path.exists():
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(path)
        time.sleep(0.002)
    time.sleep(0.005)                                    # written with one write; let it land
    return path.read_text()


def profiled(fn, cuda: bool, top: int = 12):
    """`fn()` under torch.profiler -> (its result, the ops that took the most host and device
    time). Why the decode after the GPT is slow on some hosts is a question of host against
    device time; the profiler's overhead inflates the timed row, so this is opt-in."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        result = fn()
    ops = prof.key_averages()

    def rows(key: str) -> list[dict]:
        ranked = sorted(ops, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:top]
        return [dict(op=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                     device_ms=(getattr(e, "self_device_time_total", 0) or 0) / 1e3) for e in ranked]
    return result, dict(by_cpu=rows("self_cpu_time_total"), by_device=rows("self_device_time_total"))


class GcTimer:
    """Python garbage collections during a block: how many, and their total and longest pause
    (a full collection over a large engine heap stops the step loop for as long as it runs)."""

    def __enter__(self) -> "GcTimer":
        import gc

        self.count, self.total_s, self.max_s, self._t0 = 0, 0.0, 0.0, 0.0
        gc.callbacks.append(self._on_gc)
        return self

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            took = time.perf_counter() - self._t0
            self.count, self.total_s, self.max_s = self.count + 1, self.total_s + took, max(self.max_s, took)

    def __exit__(self, *exc) -> None:
        import gc

        gc.callbacks.remove(self._on_gc)

    def summary(self) -> dict[str, float]:
        return dict(collections=self.count, total_ms=round(self.total_s * 1e3, 1),
                    longest_ms=round(self.max_s * 1e3, 1))


def cuda_memory_counters(cuda: bool) -> dict[str, float]:
    """The caching allocator's device allocations, frees and retries so far, and the free GPU
    memory: a round that allocates from the device every step (memory tight after the audio
    models and the decoder's warm-up) synchronises every step, which async scheduling cannot hide."""
    if not cuda:
        return {}
    import torch

    st = torch.cuda.memory_stats()
    return dict(device_allocs=st.get("num_device_alloc", 0), device_frees=st.get("num_device_free", 0),
                alloc_retries=st.get("num_alloc_retries", 0), free_gib=torch.cuda.mem_get_info()[0] / 2**30)


def cuda_memory_delta(before: dict, after: dict) -> dict[str, float]:
    """Counts during the round, and the free memory at its start."""
    if not before:
        return {}
    out = {k: after[k] - before[k] for k in ("device_allocs", "device_frees", "alloc_retries")}
    out["free_gib_at_start"] = round(before["free_gib"], 2)
    return out


def child_engine(args) -> None:
    """One ChatTTS engine: start, warm up, then one timed share per round, each after the barrier."""
    plan = json.loads(Path(args.plan).read_text())
    if plan.get("pin_cores"):
        # Before torch and vLLM start threads (they inherit this): engine k gets the k-th slice of
        # the cores, so N host-bound engine loops and their pools do not migrate onto each other.
        pin_process(core_slice(os.sched_getaffinity(0), args.rank, len(plan["engine_kwargs"])))
    import torch

    from chattts_vllm.audio.checkpoint import load_audio_models
    from chattts_vllm.synthesize import ChatTTS

    k, sync, frames = args.rank, Path(args.sync), plan["frames"]
    shares = [r["shares"][k] if k < len(r["shares"]) else 0 for r in plan["rounds"]]
    offsets = [sum(r["shares"][:k]) for r in plan["rounds"]]
    cuda = torch.cuda.is_available()
    # The engine runs in this process, so vLLM's multiprocess worker does not cut torch's CPU
    # threads for it: N engines would each start an OpenMP pool as wide as the machine for the
    # CPU side of the decode (stacking, copies). Give each engine its share of the cores.
    n_cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n_cores if plan.get("pin_cores") else n_cores // len(plan["engine_kwargs"])))
    t0 = time.time()
    tts = ChatTTS(args.model, **plan["engine_kwargs"][k])
    audio = load_audio_models(args.model, device="cuda" if cuda else "cpu",
                              dtype=torch.bfloat16 if cuda else torch.float32)
    t_up = time.time()
    big = max(shares)
    texts, ps = requests_for(10**6 * (k + 1), big, min(24, frames))
    tts.infer_code(texts, ps, use_tqdm=False)                     # every batch size down from `big`
    tts.infer_code(texts[:1], ps[:1], use_tqdm=False)
    # A few requests at the full length, as the stock child warms up: the timed round must not be
    # this engine's first long generation while stock's is not.
    tts.infer_code(*requests_for(10**6 * (k + 1), min(big, 8), frames), use_tqdm=False)
    modes = {r.get("decode", "after") for r in plan["rounds"]}
    if "after" in modes:
        warm_decoder(audio, set().union(*(chunk_sizes(s, DECODE_CHUNK) for s in shares)), frames, cuda)
    if "overlap" in modes:
        from chattts_vllm.audio.convnext import triton_kernels
        from chattts_vllm.serving.overlap import GROUP, warm_up_overlap

        warm_up_overlap(audio, set().union(*(chunk_sizes(s, GROUP) for s in shares)), frames)
        triton_kernels("tune_cache").save()
    log(f"engine {k}: up in {t_up - t0:.0f} s, warmed in {time.time() - t_up:.0f} s")
    (sync / f"ready-{k}").write_text(json.dumps({"start_s": t_up - t0, "warm_s": time.time() - t_up}))
    for r, (share, off) in enumerate(zip(shares, offsets)):
        t_go = float(wait_file(sync / f"go-{r}"))
        while time.time() < t_go:
            pass
        out = {"share": share}
        if share:
            texts, ps = requests_for(off, share, frames)
            mem0 = cuda_memory_counters(cuda)
            t_start = time.time()
            watcher = None
            if plan["rounds"][r].get("decode") == "overlap":
                from chattts_vllm.serving.overlap import OverlappedDecode

                watcher = OverlappedDecode(audio)
            with GcTimer() as gc_timer:
                # As `ChatTTS.synthesize` collects results it decodes at once: mapped, not copied.
                res = tts.infer_code(texts, ps, use_tqdm=False, watcher=watcher, mapped=True)
            t_gpt = time.time()
            if watcher is not None:
                samples = sum(len(w) for w in watcher.finish(res))
                if cuda:
                    torch.cuda.synchronize()
                out["streamed_frames"] = sum(g.pushed * len(g.rows) for g in watcher.groups)
            else:
                frames_out = [(x.codes, x.hidden) for x in res]
                if plan.get("profile_decode"):
                    samples, out["decode_profile"] = profiled(lambda: decode(audio, frames_out, cuda), cuda)
                else:
                    samples = decode(audio, frames_out, cuda)
            t_end = time.time()
            out["gpt_phases_s"] = {k: round(v, 3) for k, v in tts.last_timing.items()}
            out["cuda_memory"] = cuda_memory_delta(mem0, cuda_memory_counters(cuda))
            out["gpt_gc"] = gc_timer.summary()
            out.update(frames=sum(x.num_frames for x in res), samples=samples, t_go=t_go,
                       t_start=t_start, t_gpt_end=t_gpt, t_end=t_end, gpt_s=t_gpt - t_start,
                       decode_s=t_end - t_gpt)
        tmp = sync / f".done-{r}-{k}"
        tmp.write_text(json.dumps(out))
        tmp.rename(sync / f"done-{r}-{k}")
    sys.stdout.flush()
    if not in_process(os.environ):
        tts.close()                      # its engine-core process would outlive os._exit
    os._exit(0)                          # skip the engine's teardown: the parent only needs the files


def make_stock_llama(path: Path, num_layers: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=num_layers,
                      num_attention_heads=12, num_key_value_heads=12, vocab_size=626,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def child_stock(args) -> None:
    import random

    from vllm import LLM, SamplingParams

    plan = json.loads(Path(args.plan).read_text())
    frames = plan["frames"]
    llm = LLM(model=args.model, skip_tokenizer_init=True, **plan["engine_kwargs"][0])
    sp = SamplingParams(temperature=0.3, top_p=0.7, top_k=20, repetition_penalty=1.05,
                        max_tokens=frames, min_tokens=frames, ignore_eos=True, detokenize=False)
    rows = []
    for b in plan["batches"]:
        prompts = [{"prompt_token_ids": [random.randrange(626) for _ in range(20)]} for _ in range(b)]
        llm.generate(prompts[:min(b, 8)], sp, use_tqdm=False)          # warm-up
        rates = []
        gcs = []
        for _ in range(plan.get("repeats", 1)):
            with GcTimer() as gc_timer:
                t0 = time.perf_counter()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                t = time.perf_counter() - t0
            gcs.append(gc_timer.summary())
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            rates.append(n / t)
        rate = statistics.median_low(rates)          # a measured round, as ChatTTS's rows
        rows.append(dict(batch=b, stock_frames_per_s=rate, stock_llama_audio_s_per_s=rate / FPS,
                         stock_gc=gcs,
                         **({"stock_rounds_audio_s_per_s": [round(x / FPS, 1) for x in rates]}
                            if len(rates) > 1 else {})))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows))
    sys.stdout.flush()
    if not in_process(os.environ):
        llm.llm_engine.engine_core.shutdown()   # as ChatTTS.close(): the core would outlive os._exit
    os._exit(0)


# -- planning (parent) ----------------------------------------------------------------------------

def shares_of(batch: int, n: int) -> list[int]:
    return [batch // n + (k < batch % n) for k in range(n)]


def graph_batch(share: int) -> int:
    """The CUDA-graph size that covers a decode batch of `share`: vLLM captures 1, 2, 4, then
    multiples of 8 below 256 and of 16 from 256, up to `max_cudagraph_capture_size`, and runs a
    batch larger than every captured size without graphs. A share of 170 with a capture limit
    of 170 therefore ran eagerly (2026-11-28: that engine took 9.4 s where the others took 3)."""
    if share <= 4:
        return 1 << (max(share, 1) - 1).bit_length()
    step = 8 if share < 256 else 16
    return -(-share // step) * step


def kv_bytes_per_token(model_dir: Path, kv_dtype: str, dtype: str) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    size = 1 if kv_dtype.startswith("fp8") else (4 if dtype == "float32" else 2)
    return cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * size


def max_prompt_len(model_dir: Path, batch: int) -> int:
    from chattts_vllm.gpt.requests import code_request
    from chattts_vllm.text.prompt import ChatTTSTokenizer

    tok = ChatTTSTokenizer.from_dir(model_dir)
    _, (params,) = requests_for(0, 1, 1)
    return max(len(code_request(tok, TEXT.format(i), params).prompt["prompt_token_ids"])
               for i in (0, batch, 10**6 * 9 + batch))


def base_kwargs(args, cuda: bool) -> dict:
    kw = dict(dtype=args.dtype, max_model_len=args.max_model_len, enable_prefix_caching=False)
    if args.kv_cache_dtype != "auto":
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    if not cuda:
        kw["enforce_eager"] = True
    return kw


def sweep_kwargs(args, max_batch: int, cuda: bool) -> dict:
    kw = dict(base_kwargs(args, cuda), max_num_seqs=max_batch)
    if cuda:
        kw.update(gpu_memory_utilization=0.85, max_num_batched_tokens=65536,
                  compilation_config={"max_cudagraph_capture_size": max(512, graph_batch(max_batch))})
    return kw


def engine_sets(args, model: Path, cuda: bool, total_gib: float) -> list[dict]:
    """Process sets for the multi-engine rounds: one set for all rounds if it fits in memory."""
    rounds = [dict(engines=n, batch=b, shares=shares_of(b, n), decode=m, repeat=i)
              for i in range(args.repeats) for b in args.batches for n in args.engines
              for m in decode_modes(args)]
    per_seq = math.ceil((max_prompt_len(model, max(args.batches)) + args.frames + 1) / BLOCK) * BLOCK
    per_tok = kv_bytes_per_token(model, args.kv_cache_dtype, args.dtype)

    def make(rounds_: list[dict], ids: list[int]) -> dict:
        n = max(len(r["shares"]) for r in rounds_)
        kws = []
        for k in range(n):
            share = max(r["shares"][k] if k < len(r["shares"]) else 0 for r in rounds_)
            kw = dict(base_kwargs(args, cuda), max_num_seqs=graph_batch(share))
            if cuda:
                kv = int(share * per_seq * per_tok * 1.1) + (256 << 20)
                kw.update(kv_cache_memory_bytes=kv,
                          gpu_memory_utilization=round(min(0.9 / n, kv / 2**30 / total_gib + 0.03), 3),
                          max_num_batched_tokens=min(65536, max(8192, share * 128)),
                          compilation_config={"max_cudagraph_capture_size": graph_batch(share)})
            kws.append(kw)
        need = sum(kw.get("kv_cache_memory_bytes", 0) / 2**30 + OVERHEAD_GIB for kw in kws)
        return dict(rounds=rounds_, round_ids=ids, engine_kwargs=kws, need_gib=need)

    ids = list(range(len(rounds)))
    one = make(rounds, ids)
    if not cuda or one["need_gib"] <= 0.9 * total_gib:
        return [one]
    # Greedy: engine counts from the largest down, each added to the current set while it fits.
    sets, cur = [], []
    for n in sorted(set(args.engines), reverse=True):
        mine = [i for i in ids if rounds[i]["engines"] == n]
        trial = cur + mine
        if cur and make([rounds[i] for i in trial], trial)["need_gib"] > 0.9 * total_gib:
            sets.append(cur)
            trial = mine
        cur = trial
    sets.append(cur)
    log(f"all rounds in one set need {one['need_gib']:.0f} GiB > 90% of {total_gib:.0f}: "
        f"{len(sets)} sets of engine processes")
    return [make([rounds[i] for i in sorted(ids_)], sorted(ids_)) for ids_ in sets]


def decode_modes(args) -> list[str]:
    return ["after", "overlap"] if args.decode == "both" else [args.decode]


def in_process(env) -> bool:
    return env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip().lower() in ("0", "false")


def child_env(cuda: bool, frame_dir: str | None, core: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # `--core own` is vLLM's default: the engine core steps in its own process while this one
    # turns its outputs into results (each with its own GIL); `inproc` does both in one loop.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if core == "inproc" else "1"
    if not cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if frame_dir:
        env["CHATTTS_VLLM_FRAME_DIR"] = frame_dir
    return env


def run_engine_set(args, model: Path, eset: dict, work: Path, env: dict, deadline: float) -> list[dict]:
    """Start the set's engines one after the other, then run its rounds; rows for finished rounds."""
    sync = work / f"sync-{eset['round_ids'][0]}"
    sync.mkdir()
    plan = dict(frames=args.frames, rounds=eset["rounds"], engine_kwargs=eset["engine_kwargs"],
                profile_decode=args.profile_decode, pin_cores=args.pin_cores)
    (sync / "plan.json").write_text(json.dumps(plan))
    procs, rows = [], []
    try:
        for k in range(len(eset["engine_kwargs"])):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--child", "engine", "--rank", str(k), "--model", str(model),
                 "--plan", str(sync / "plan.json"), "--sync", str(sync)], env=env))
            while not (sync / f"ready-{k}").exists():
                if procs[k].poll() is not None:
                    raise RuntimeError(f"engine {k} exited with {procs[k].returncode} before it was ready")
                if time.time() > deadline:
                    raise TimeoutError(f"engine {k} not ready before the deadline")
                time.sleep(0.2)
        ready = [json.loads((sync / f"ready-{k}").read_text()) for k in range(len(procs))]
        for r, rnd in enumerate(eset["rounds"]):
            t_go = time.time() + 0.3
            (sync / f"go-{r}").write_text(repr(t_go))
            outs = []
            for k, p in enumerate(procs):
                f = sync / f"done-{r}-{k}"
                while not f.exists():
                    if p.poll() is not None:
                        raise RuntimeError(f"engine {k} exited with {p.returncode} in round {rnd}")
                    if time.time() > deadline:
                        raise TimeoutError(f"round {rnd} not done before the deadline")
                    time.sleep(0.01)
                outs.append(json.loads(f.read_text()))
            act = [o for o in outs if o["share"]]
            n = sum(o["frames"] for o in act)
            gpt_wall = max(o["t_gpt_end"] for o in act) - t_go
            e2e_wall = max(o["t_end"] for o in act) - t_go
            row = dict(engines=rnd["engines"], batch=rnd["batch"], shares=rnd["shares"],
                       decode=rnd.get("decode", "after"), frames=n,
                       gpt_s=gpt_wall, gpt_frames_per_s=n / gpt_wall, gpt_audio_s_per_s=n / FPS / gpt_wall,
                       decode_s=max(o["decode_s"] for o in act), e2e_s=e2e_wall,
                       e2e_audio_s_per_s=n / FPS / e2e_wall,
                       per_engine_gpt_s=[round(o["gpt_s"], 3) for o in act],
                       per_engine_decode_s=[round(o["decode_s"], 3) for o in act],
                       # Each engine's GPT time by phase (requests built / engine / read back).
                       per_engine_gpt_phases_s=[o.get("gpt_phases_s") for o in act],
                       per_engine_cuda_memory=[o.get("cuda_memory") for o in act],
                       per_engine_gpt_gc=[o.get("gpt_gc") for o in act],
                       **({"streamed_frames": sum(o["streamed_frames"] for o in act)}
                          if rnd.get("decode") == "overlap" else {}),
                       **({"decode_profile": [o.get("decode_profile") for o in act]}
                          if args.profile_decode else {}),
                       start_skew_s=max(o["t_start"] for o in act) - t_go,
                       engine_start_s=[round(x["start_s"], 1) for x in ready],
                       kv_cache_dtype=args.kv_cache_dtype, mps=args.mps,
                       **({"pin_cores": True} if args.pin_cores else {}))
            if args.repeats > 1:
                row["repeat"] = rnd["repeat"]
            rows.append(row)
            log(f"round engines={row['engines']} batch={row['batch']} decode={row['decode']} "
                f"repeat={rnd.get('repeat', 0)}: "
                f"gpt {row['gpt_audio_s_per_s']:.1f}, "
                f"e2e {row['e2e_audio_s_per_s']:.1f} audio-s/s (gpt {gpt_wall:.2f} s, e2e {e2e_wall:.2f} s; "
                f"phases {row['per_engine_gpt_phases_s']}; cuda memory {row['per_engine_cuda_memory']}; "
                f"gc {row['per_engine_gpt_gc']})")
    except (RuntimeError, TimeoutError) as e:
        log(f"engine set stopped early: {e}")
        for p in procs:
            p.kill()
    finally:
        t_end = time.time() + 30
        for p in procs:
            try:
                p.wait(timeout=max(1.0, t_end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
    return rows


def run_stock(args, work: Path, env: dict, cuda: bool, deadline: float) -> dict[int, dict]:
    path = make_stock_llama(work / "stock", args.num_layers)
    plan = dict(frames=args.frames, batches=args.batches, repeats=args.repeats,
                engine_kwargs=[sweep_kwargs(args, max(args.batches), cuda)])
    (work / "stock-plan.json").write_text(json.dumps(plan))
    out = work / "stock.json"
    try:
        subprocess.run([sys.executable, __file__, "--child", "stock", "--model", path, "--plan",
                        str(work / "stock-plan.json"), "--out", str(out)], env=env, check=True,
                       timeout=max(10.0, deadline - time.time()))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log(f"stock run failed: {e}")
        return {}
    return {r["batch"]: r for r in json.loads(out.read_text())}


# -- results ------------------------------------------------------------------------------------

def merge(old: list[dict], new: list[dict], key) -> list[dict]:
    keys = {key(r) for r in new}
    return sorted([r for r in old if key(r) not in keys] + new, key=key)


def config_key(r: dict) -> tuple:
    return (r["engines"], r["batch"], r.get("kv_cache_dtype", "auto"), bool(r.get("mps")),
            r.get("decode", "after"), bool(r.get("pin_cores")))


def median_round(rounds: list[dict]) -> list[dict]:
    """[the round with the median GPT rate] (lower median for an even count), carrying every
    round's GPT and e2e rates when there are several (`--repeats` on the single-engine sweep); []
    for none."""
    if len(rounds) <= 1:
        return rounds
    ranked = sorted(rounds, key=lambda r: r["gpt_audio_s_per_s"])
    mid = dict(ranked[(len(ranked) - 1) // 2])
    mid["gpt_rounds_audio_s_per_s"] = [round(r["gpt_audio_s_per_s"], 1) for r in rounds]
    mid["e2e_rounds_audio_s_per_s"] = [round(r["e2e_audio_s_per_s"], 1) for r in rounds]
    return [mid]


def summarize(rows: list[dict]) -> list[dict]:
    """Each engines configuration's rounds: how many, median and best GPT and end to end. The
    spread between repeats (1,069-1,428 e2e for one configuration on 2026-11-29) is why one round
    alone says little."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(config_key(r), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        g = sorted(r["gpt_audio_s_per_s"] for r in rs)
        e = sorted(r["e2e_audio_s_per_s"] for r in rs)
        out.append(dict(zip(("engines", "batch", "kv_cache_dtype", "mps", "decode", "pin_cores"), key),
                        rounds=len(rs), gpt_median=statistics.median(g), gpt_best=g[-1],
                        e2e_median=statistics.median(e), e2e_worst=e[0], e2e_best=e[-1]))
    return out


def best_config(data: dict) -> dict | None:
    cands = [dict(r, engines=r.get("engines", 1)) for sec in ("rows", "variants", "engines")
             for r in data.get(sec, []) if r.get("e2e_audio_s_per_s")]
    cands += [dict(r, engines=1, decode="overlap", e2e_audio_s_per_s=r["e2e_overlap_audio_s_per_s"])
              for sec in ("rows", "variants") for r in data.get(sec, []) if r.get("e2e_overlap_audio_s_per_s")]
    return max(cands, key=lambda r: r["e2e_audio_s_per_s"], default=None)


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = data.get("engines", [])
    fig, axes = plt.subplots(1, 2 if eng else 1, figsize=(11 if eng else 6, 4), squeeze=False)
    ax = axes[0][0]
    for sec, suffix in (("rows", ""), ("variants", " (kv {})")):
        for key, label in [("gpt_audio_s_per_s", "ChatTTS GPT only"),
                           ("e2e_audio_s_per_s", "ChatTTS end to end"),
                           ("e2e_overlap_audio_s_per_s", "ChatTTS end to end, decode overlapped"),
                           ("stock_llama_audio_s_per_s", "stock vLLM Llama (ceiling)")]:
            groups: dict[str, list] = {}
            for r in data.get(sec, []):
                if key in r:
                    groups.setdefault(r.get("kv_cache_dtype", "auto"), []).append((r["batch"], r[key]))
            for kv, pts in groups.items():
                ax.plot(*zip(*sorted(pts)), marker="o", linestyle="-" if sec == "rows" else "--",
                        label=label + suffix.format(kv))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (concurrent 10 s utterances)")
    ax.set_ylabel("audio seconds per second")
    ax.set_title("one engine", fontsize=9)
    ax.legend(fontsize=7)
    if eng:
        ax = axes[0][1]
        groups = {}
        for r in eng:
            groups.setdefault((r["batch"], r.get("kv_cache_dtype", "auto"), r.get("mps", False),
                               r.get("decode", "after"), bool(r.get("pin_cores"))), []).append(r)
        for (b, kv, mps, dec, pin), rs in sorted(groups.items()):
            rs = sorted(rs, key=lambda r: r["engines"])
            tag = (f"batch {b}" + (f", kv {kv}" if kv != "auto" else "") + (", MPS" if mps else "")
                   + (", decode overlapped" if dec == "overlap" else "") + (", pinned cores" if pin else ""))
            ax.plot([r["engines"] for r in rs], [r["e2e_audio_s_per_s"] for r in rs], marker="o",
                    label=f"end to end, {tag}")
            ax.plot([r["engines"] for r in rs], [r["gpt_audio_s_per_s"] for r in rs], marker="x",
                    linestyle=":", label=f"GPT, {tag}")
        ax.set_xlabel("engine processes on the GPU (batch split between them)")
        ax.set_ylabel("audio seconds per second")
        ax.set_title("several engines per GPU", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['card']}, {data['date']}, vLLM {data['vllm']}, {data['frames']} frames/utterance",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def print_tables(data: dict) -> None:
    print(f"\n{'batch':>6} {'kv':>5} {'gpt fr/s':>10} {'gpt aud/s':>10} {'e2e aud/s':>10} {'e2e ovl':>8} "
          f"{'stock aud/s':>12} {'gpt/stock':>9} {'e2e/gpt':>8}")
    for r in data.get("rows", []) + data.get("variants", []):
        g, e, o, s = (r.get(k, 0) or 0 for k in ("gpt_audio_s_per_s", "e2e_audio_s_per_s",
                                                 "e2e_overlap_audio_s_per_s", "stock_llama_audio_s_per_s"))
        print(f"{r['batch']:>6} {r.get('kv_cache_dtype', 'auto'):>5} {r.get('gpt_frames_per_s', 0):>10.0f} "
              f"{g:>10.1f} {e:>10.1f} {o:>8.1f} {s:>12.1f} {g / s if s else 0:>9.2f} {e / g if g else 0:>8.2f}")
    if data.get("engines"):
        print(f"\n{'engines':>7} {'batch':>6} {'kv':>5} {'mps':>4} {'decode':>8} {'gpt aud/s':>10} "
              f"{'e2e aud/s':>10} {'gpt s':>7} {'e2e s':>7}")
        for r in data["engines"]:
            print(f"{r['engines']:>7} {r['batch']:>6} {r.get('kv_cache_dtype', 'auto'):>5} "
                  f"{'y' if r.get('mps') else 'n':>4} {r.get('decode', 'after'):>8} {r['gpt_audio_s_per_s']:>10.1f} "
                  f"{r['e2e_audio_s_per_s']:>10.1f} {r['gpt_s']:>7.2f} {r['e2e_s']:>7.2f}"
                  f"{'  pinned cores' if r.get('pin_cores') else ''}"
                  f"{'  repeat ' + str(r['repeat']) if 'repeat' in r else ''}")
    if any(s["rounds"] > 1 for s in data.get("summary", [])):
        print(f"\n{'engines':>7} {'batch':>6} {'decode':>8} {'rounds':>6} {'gpt med':>8} {'e2e med':>8} "
              f"{'e2e min':>8} {'e2e max':>8}")
        for s in data["summary"]:
            print(f"{s['engines']:>7} {s['batch']:>6} {s['decode']:>8} {s['rounds']:>6} {s['gpt_median']:>8.1f} "
                  f"{s['e2e_median']:>8.1f} {s['e2e_worst']:>8.1f} {s['e2e_best']:>8.1f}"
                  f"{'  pinned cores' if s['pin_cores'] else ''}")
    b = data.get("best_config")
    if b:
        print(f"\nbest: {b['engines']} engine(s), batch {b['batch']}, kv {b.get('kv_cache_dtype', 'auto')}, "
              f"decode {b.get('decode', 'after')}: e2e {b['e2e_audio_s_per_s']:.1f} audio-s/s")


class MPS:
    """An MPS control daemon for the run's engine processes (pipe and log dirs private to the run)."""

    def __init__(self, root: Path, env: dict):
        if not shutil.which("nvidia-cuda-mps-control"):
            raise SystemExit("--mps: nvidia-cuda-mps-control not found")
        self.env = dict(env, CUDA_MPS_PIPE_DIRECTORY=str(root / "mps-pipe"),
                        CUDA_MPS_LOG_DIRECTORY=str(root / "mps-log"))
        for d in ("mps-pipe", "mps-log"):
            (root / d).mkdir()
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True)
        log("MPS daemon started")

    def stop(self) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env)
        log("MPS daemon stopped")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="default 1 64 256 512 1024 (sweep) or 512 (--engines)")
    p.add_argument("--frames", type=int, default=470)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-layers", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--engines", type=int, nargs="+", default=None,
                   help="several engine processes per GPU: engine counts to measure (skips the sweep)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (= model dtype) or fp8")
    p.add_argument("--mps", action="store_true", help="run the engines under an MPS daemon")
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--decode", choices=["after", "overlap", "both"], default="both",
                   help="decode after the GPT, while it generates, or each round both ways")
    p.add_argument("--pin-cores", action="store_true",
                   help="engine k runs on the k-th slice of the cores (sched_setaffinity)")
    p.add_argument("--profile-decode", action="store_true",
                   help="each engine's decode under torch.profiler (its top ops go into the JSON rows)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every round this many times (engines started once). --engines: rows "
                        "carry `repeat`, and `summary` has each configuration's median and best; "
                        "sweep: each row is the median round (stock too), with every round's rate")
    p.add_argument("--core", choices=["inproc", "own"], default=None,
                   help="engine core in each engine's process (VLLM_ENABLE_V1_MULTIPROCESSING=0) or "
                        "in its own (vLLM's default); default: the environment's setting, else inproc")
    p.add_argument("--time-limit", type=float, default=510,
                   help="seconds; rounds not finished by then are dropped and the results written")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run: 2 layers, 16 frames, float32")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--child", choices=["engine", "stock"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--sync", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "engine":
        return child_engine(args)
    if args.child == "stock":
        return child_stock(args)

    if args.core is None:
        args.core = "own" if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") and \
            not in_process(os.environ) else "inproc"
    t_begin = time.time()
    deadline = t_begin + args.time_limit
    card, total_gib = gpu_info()
    cuda = card != "cpu"
    if args.smoke:
        args.num_layers, args.frames, args.dtype = 2, min(args.frames, 16), "float32"
        args.tag = args.tag or "smoke"
    args.batches = args.batches or ([512] if args.engines else [1, 64, 256, 512, 1024])
    if args.smoke and not any(a.startswith("--batches") for a in sys.argv):
        args.batches = [4] if args.engines else [1, 4]

    from chattts_vllm.checkpoint import convert, write_random_asset

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        write_random_asset(work / "asset", num_layers=args.num_layers, seed=0)
        model = Path(convert(work / "asset", work / "model"))
        log(f"checkpoint ready ({time.time() - t_begin:.0f} s)")
        need = max(args.batches) * args.frames * (16 + 4 * 768) * 1.2
        shm = Path("/dev/shm")
        frame_dir = None
        if shm.is_dir() and shutil.disk_usage(shm).free < need:
            frame_dir = str(work / "frames")
            log(f"/dev/shm has less than {need / 2**30:.1f} GiB free: frames go to {frame_dir}")
        env = child_env(cuda, frame_dir, args.core)
        mps = MPS(work, env) if args.mps else None
        env = mps.env if mps else env
        try:
            if args.engines:
                eng_rows = []
                for eset in engine_sets(args, model, cuda, total_gib):
                    log(f"engine set: {len(eset['engine_kwargs'])} engines, {len(eset['rounds'])} rounds, "
                        f"~{eset['need_gib']:.0f} GiB")
                    eng_rows += run_engine_set(args, model, eset, work, env, deadline)
                sweep, stock = [], {}
            else:
                eset = dict(rounds=[dict(engines=1, batch=b, shares=[b], decode=m, repeat=i)
                                    for i in range(args.repeats) for b in args.batches
                                    for m in decode_modes(args)],
                            round_ids=[0], engine_kwargs=[sweep_kwargs(args, max(args.batches), cuda)],
                            need_gib=0)
                # Stock first: the ceiling is the number a ratio cannot do without, and ChatTTS's
                # engine start (Decoder autotuning included) must not eat its time.
                stock = {} if args.skip_stock else run_stock(args, work, env, cuda, deadline)
                sweep = run_engine_set(args, model, eset, work, env, deadline)
                eng_rows = []
        finally:
            if mps:
                mps.stop()

    import vllm

    date = dt.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"throughput-{card}-{date}{'-' + args.tag if args.tag else ''}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    core = "in-process" if in_process(env) else "own process"
    data.update(card=card, date=date, vllm=vllm.__version__, frames=args.frames,
                num_layers=args.num_layers, dtype=args.dtype, engine_core=core)
    rows = []
    drop = ("engines", "shares", "per_engine_gpt_s", "per_engine_decode_s", "start_skew_s", "e2e_s", "mps",
            "decode", "streamed_frames", "repeat")
    for b in args.batches:
        after = median_round([r for r in sweep if r["batch"] == b and r["decode"] == "after"])
        over = median_round([r for r in sweep if r["batch"] == b and r["decode"] == "overlap"])
        if not after and not over:
            continue
        row = {k: v for k, v in (after or over)[0].items() if k not in drop}
        for many, one in (("per_engine_gpt_phases_s", "gpt_phases_s"), ("per_engine_cuda_memory", "cuda_memory"),
                          ("per_engine_gpt_gc", "gpt_gc")):
            if row.get(many):                                # one engine: its own, unlisted
                row[one] = row.pop(many)[0]
        if not after:                    # overlap only: its GPT and e2e are the row's
            row["decode"] = "overlap"
        if over and after:
            o = over[0]
            row.update(gpt_overlap_audio_s_per_s=o["gpt_audio_s_per_s"],
                       e2e_overlap_audio_s_per_s=o["e2e_audio_s_per_s"], decode_overlap_s=o["decode_s"])
        rows.append({**row, **stock.get(b, {})})
    if rows:
        sec = "rows" if args.kv_cache_dtype == "auto" else "variants"
        data[sec] = merge(data.get(sec, []), rows, key=lambda r: (r.get("kv_cache_dtype", "auto"), r["batch"]))
    if eng_rows:
        data["engines"] = merge(data.get("engines", []), eng_rows,
                                key=lambda r: (r.get("kv_cache_dtype", "auto"), bool(r.get("mps")),
                                               r["batch"], r["engines"], r.get("decode", "after"),
                                               bool(r.get("pin_cores")), r.get("repeat", 0)))
        data["summary"] = summarize(data["engines"])
    data["best_config"] = best_config(data)
    data["notes"] = ("audio-s/s = frames / 46.875 / wall s; e2e = GPT, then Decoder + Vocos (bf16, Triton, "
                     "warmed up for every shape), audio copied to host; engines rows: N engine processes "
                     "on one GPU, the batch split between them, wall time from a common start to the last "
                     "engine's end")
    path.write_text(json.dumps(data, indent=1))
    plot(data, path.with_suffix(".png"))
    log(f"wrote {path} (+ .png), {time.time() - t_begin:.0f} s in all")
    print_tables(data)


if __name__ == "__main__":
    main()
