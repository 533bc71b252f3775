"""Offline throughput of ChatTTS on vLLM: 10 s utterances (470 frames) at several batch sizes.

Rows: GPT only (frames/s and audio-s/s, codes and hidden states delivered to the caller), end to end
(GPT, then Decoder + Vocos on the same GPU), and stock vLLM on a same-shape Llama (20 layers,
hidden 768, vocab 626, one head) as the ceiling, all in the same run. Each engine runs in its own
subprocess so that GPU memory is returned between them.

    python benchmarks/bench_throughput.py [--batches 1 64 256 512 1024] [--frames 470]

Writes benchmarks/results/throughput-<card>-<date>.json and a plot; prints a table last.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FPS = 46.875
RESULTS = Path(__file__).resolve().parent / "results"


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"


def engine_kwargs(max_batch: int, dtype: str) -> dict:
    import torch

    kw = dict(dtype=dtype, max_model_len=1024, max_num_seqs=max_batch,
              enable_prefix_caching=False)
    if torch.cuda.is_available():
        kw.update(gpu_memory_utilization=0.85, max_num_batched_tokens=65536,
                  compilation_config={"max_cudagraph_capture_size": max(512, max_batch)})
    return kw


def run_chattts(model_dir: str, batches: list[int], frames: int, dtype: str, e2e: bool) -> list[dict]:
    import numpy as np
    import torch

    from chattts_vllm.params import InferCodeParams
    from chattts_vllm.synthesize import ChatTTS

    tts = ChatTTS(model_dir, **engine_kwargs(max(batches), dtype))
    audio = None
    if e2e:
        from chattts_vllm.audio.checkpoint import load_audio_models

        audio = load_audio_models(model_dir, device="cuda" if torch.cuda.is_available() else "cpu",
                                  dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    rows = []
    for b in batches:
        texts = [f"utterance {i} of the throughput benchmark, ten seconds long." for i in range(b)]
        ps = [InferCodeParams(manual_seed=i, min_new_token=frames, max_new_token=frames) for i in range(b)]
        tts.infer_code(texts[: min(b, 8)], ps[: min(b, 8)], use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        res = tts.infer_code(texts, ps, use_tqdm=False)
        t_gpt = time.perf_counter() - t0
        n = sum(r.num_frames for r in res)
        row = dict(batch=b, frames=n, gpt_s=t_gpt, gpt_frames_per_s=n / t_gpt,
                   gpt_audio_s_per_s=n / FPS / t_gpt)
        if audio is not None:
            t1 = time.perf_counter()
            with torch.inference_mode():
                dev = next(audio.decoder.parameters()).device
                for i in range(0, b, 64):
                    h = torch.from_numpy(np.stack([r.hidden for r in res[i:i + 64]])).to(dev)
                    mel = audio.decoder(h.transpose(1, 2).to(next(audio.decoder.parameters()).dtype))
                    audio.vocos(mel)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            t_dec = time.perf_counter() - t1
            row.update(decode_s=t_dec, e2e_audio_s_per_s=n / FPS / (t_gpt + t_dec))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def make_stock_llama(path: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=20,
                      num_attention_heads=12, num_key_value_heads=12, vocab_size=626,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def run_stock(model_dir: str, batches: list[int], frames: int, dtype: str) -> list[dict]:
    import random

    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, skip_tokenizer_init=True, **engine_kwargs(max(batches), dtype))
    sp = SamplingParams(temperature=0.3, top_p=0.7, top_k=20, repetition_penalty=1.05,
                        max_tokens=frames, min_tokens=frames, ignore_eos=True, detokenize=False)
    rows = []
    for b in batches:
        prompts = [{"prompt_token_ids": [random.randrange(626) for _ in range(20)]} for _ in range(b)]
        llm.generate(prompts[: min(b, 8)], sp, use_tqdm=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        t = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append(dict(batch=b, stock_frames_per_s=n / t, stock_llama_audio_s_per_s=n / FPS / t))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _child(args) -> None:
    if args.child == "chattts":
        rows = run_chattts(args.model, args.batches, args.frames, args.dtype, e2e=True)
    else:
        rows = run_stock(args.model, args.batches, args.frames, args.dtype)
    Path(args.out).write_text(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 512, 1024])
    p.add_argument("--frames", type=int, default=470)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-layers", type=int, default=20)
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--child", choices=["chattts", "stock"])
    p.add_argument("--model")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        return _child(args)

    from chattts_vllm.checkpoint import convert, write_random_asset

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_random_asset(d / "asset", num_layers=args.num_layers, seed=0)
        model = convert(d / "asset", d / "model")
        results = {}
        jobs = [("chattts", str(model))]
        if not args.skip_stock:
            jobs.append(("stock", make_stock_llama(d / "stock")))
        for name, path in jobs:
            out = d / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", name, "--model", path, "--out", str(out),
                   "--frames", str(args.frames), "--dtype", args.dtype, "--batches",
                   *map(str, args.batches)]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            results[name] = {r["batch"]: r for r in json.loads(out.read_text())}

    import vllm

    rows = []
    for b in args.batches:
        row = {"batch": b, **results["chattts"].get(b, {}), **results.get("stock", {}).get(b, {})}
        rows.append(row)
    card, date = card_name(), dt.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"throughput-{card}-{date}.json"
    path.write_text(json.dumps({"card": card, "date": date, "vllm": vllm.__version__,
                                "frames": args.frames, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in [("gpt_audio_s_per_s", "ChatTTS GPT only"),
                           ("e2e_audio_s_per_s", "ChatTTS end to end"),
                           ("stock_llama_audio_s_per_s", "stock vLLM Llama (ceiling)")]:
            pts = [(r["batch"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent 10 s utterances)")
        ax.set_ylabel("audio seconds per second")
        ax.set_title(f"{card}, {date}, vLLM {vllm.__version__}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"))
    except ImportError:
        pass
    print(f"\nwrote {path}")
    print(f"{'batch':>6} {'gpt fr/s':>10} {'gpt aud/s':>10} {'e2e aud/s':>10} {'stock aud/s':>12}")
    for r in rows:
        print(f"{r['batch']:>6} {r.get('gpt_frames_per_s', 0):>10.0f} {r.get('gpt_audio_s_per_s', 0):>10.1f} "
              f"{r.get('e2e_audio_s_per_s', 0):>10.1f} {r.get('stock_llama_audio_s_per_s', 0):>12.1f}")


if __name__ == "__main__":
    main()
