"""Audio back end throughput: GPT hidden states → Decoder → Vocos → 24 kHz waveform.

Batches of 10 s utterances (470 GPT frames) through PyTorch eager, torch.compile and the Triton
kernels (split and fused MLP), in one run, on the same random weights in the official layout.

    python benchmarks/bench_decoder.py                      # one H100: bf16, batches 32 and 128
    python benchmarks/bench_decoder.py --smoke              # CPU smoke check, tiny model

Reports audio seconds per second, achieved TFLOP/s and an effective memory bandwidth (bytes of the
Triton split schedule — each kernel's reads and writes plus the weights — over time, the same
numerator for every implementation), and each implementation's max relative error vs eager.
Writes benchmarks/results/decoder-<card>-<date>.json (+ .png) and prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from chattts_vllm.audio.checkpoint import (decoder_shapes, load_decoder, load_vocos,
                                           random_audio_state_dicts, random_state_dict, vocos_shapes)
from chattts_vllm.audio.convnext import set_backend, triton_kernels

SAMPLE_RATE, HOP = 24000, 256


def card_name(device: torch.device) -> tuple[str, str]:
    """(full name, short slug for the file name)."""
    if device.type != "cuda":
        return "cpu", "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"(H100|H200|A100|L40S?|B200|GH200|RTX ?\d{4})", name, re.I)
    return name, (m.group(1) if m else name).lower().replace(" ", "")


def build(smoke: bool, device, dtype):
    if smoke:
        dec = load_decoder(random_state_dict(decoder_shapes(idim=32, odim=32, hidden=32, n_layer=2, bn_dim=16)))
        voc = load_vocos(random_state_dict(vocos_shapes(dim=32, intermediate=64, n_layer=2)))
    else:
        sd = random_audio_state_dicts(0)
        dec, voc = load_decoder(sd["Decoder.safetensors"]), load_vocos(sd["Vocos.safetensors"])
    return dec.to(device, dtype), voc.to(device, dtype)


def cost_model(dec, voc, batch: int, frames: int, elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward under the Triton split schedule (see module doc)."""
    rows = batch * 2 * frames                       # mel frames
    flops = bytes_ = 0.0

    def conv(cin, cout, k, extra_out=0):
        nonlocal flops, bytes_
        flops += 2 * rows * cin * cout * k
        bytes_ += rows * (cin + cout + extra_out) * elem

    def block(c, i):
        nonlocal flops, bytes_
        flops += rows * (2 * 7 * c + 4 * c * i)
        bytes_ += rows * (5 * c + 2 * i) * elem     # dwconv+LN r/w, GEMM1 r/w, GEMM2 r(+res)/w

    s = dec.decoder
    conv(s.conv_in[0].in_channels, s.conv_in[0].out_channels, 3)
    conv(s.conv_in[2].in_channels, s.conv_in[2].out_channels, 3)
    for b in s.decoder_block:
        block(b.pwconv1.in_features, b.pwconv1.out_features)
    conv(s.conv_out.in_channels, s.conv_out.out_channels, 1)
    conv(dec.out_conv.in_channels, dec.out_conv.out_channels, 3)
    bb = voc.backbone
    conv(bb.embed.in_channels, bb.embed.out_channels, 7)
    bytes_ += 2 * rows * bb.embed.out_channels * elem * 2          # the two LayerNorms
    for b in bb.convnext:
        block(b.pwconv1.in_features, b.pwconv1.out_features)
    n_fft = voc.head.istft.window.shape[0]
    conv(bb.embed.out_channels, n_fft + 2, 1)
    bytes_ += rows * (n_fft + 2) * 4 * 3 + batch * frames * 2 * HOP * 4    # fp32 spectrum, ISTFT
    bytes_ += sum(p.numel() * p.element_size() for m in (dec, voc) for p in m.parameters())
    return flops, bytes_


def implementations(dec, voc, device, names: list[str], compile_mode: str):
    """name → callable(hidden (B, 768, T)) → waveform, each on its own copy of the modules."""
    def make(backend: str, mlp: str | None = None):
        d, v = set_backend(copy.deepcopy(dec), backend), set_backend(copy.deepcopy(voc), backend)

        def run(h):
            if mlp is not None:
                triton_kernels("convnext").MLP_MODE = mlp
            return v(d(h))
        return run

    impls = {}
    for name in names:
        if name == "eager":
            impls[name] = make("native")
        elif name == "compile":
            impls[name] = torch.compile(make("native"), mode=compile_mode, dynamic=False)
        elif name == "triton":
            impls[name] = make("triton", "split")
        elif name == "triton-fused":
            impls[name] = make("triton", "fused")
        else:
            raise ValueError(name)
    return impls


def cuda_graph(fn, x):
    """Capture fn(x) once (after warm-up, which also runs the Triton autotuner); replay it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x)
    return lambda _x: (g.replay(), out)[1]


def time_it(fn, x, warmup: int, iters: int, device, desc: str) -> tuple[float, torch.Tensor]:
    """Median seconds per call."""
    for _ in range(warmup):
        out = fn(x)
    times = []
    for _ in tqdm(range(iters), desc=desc, leave=False):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["batch"], r["audio_s_per_s"]) for r in rows if r["impl"] == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (10 s utterances)")
    ax.set_ylabel("audio seconds / second")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--frames", type=int, default=None, help="GPT frames per utterance (470 = 10 s)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ap.add_argument("--impls", nargs="+", default=None,
                    help="eager compile triton triton-fused (default: all; CPU: eager)")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--cuda-graph", action="store_true", help="replay eager/Triton as CUDA graphs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU-friendly sizes")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batches = args.batch or ([1, 2] if args.smoke else [32, 128])
    frames = args.frames or (24 if args.smoke else 470)
    names = args.impls or (["eager", "compile", "triton", "triton-fused"] if device.type == "cuda" else ["eager"])
    out_dir = args.out_dir or Path(__file__).parent / "results" / ("tmp" if args.smoke else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    card, slug = card_name(device)
    torch.manual_seed(0)

    dec, voc = build(args.smoke, device, dtype)
    impls = implementations(dec, voc, device, names, args.compile_mode)
    audio_s = (2 * frames - 1) * HOP / SAMPLE_RATE
    rows = []
    with torch.inference_mode():
        for batch in batches:
            hidden = torch.randn(batch, dec.frame_dim, frames, device=device, dtype=dtype)
            flops, nbytes = cost_model(dec, voc, batch, frames, torch.empty(0, dtype=dtype).element_size())
            ref = None
            for name, fn in impls.items():
                run = fn
                if args.cuda_graph and device.type == "cuda" and name != "compile":
                    run = cuda_graph(fn, hidden)
                t0 = time.perf_counter()
                run(hidden)                                  # first call: compile / autotune
                first_s = time.perf_counter() - t0
                sec, wav = time_it(run, hidden, args.warmup, args.iters, device, f"{name} B={batch}")
                ref = wav.float() if ref is None else ref
                err = ((wav.float() - ref).abs().max() / ref.abs().max()).item()
                rows.append(dict(impl=name, batch=batch, frames=frames, dtype=str(dtype).split(".")[-1],
                                 ms=sec * 1e3, audio_s_per_s=batch * audio_s / sec,
                                 tflops=flops / sec / 1e12, hbm_gb_s=nbytes / sec / 1e9,
                                 first_call_s=first_s, max_rel_err_vs_first=err,
                                 cuda_graph=bool(args.cuda_graph and name != "compile")))
    for r in rows:
        base = next((b for b in rows if b["impl"] == "compile" and b["batch"] == r["batch"]), None)
        r["speedup_vs_compile"] = base["ms"] / r["ms"] if base else None

    date = datetime.date.today().isoformat()
    stem = f"decoder-{slug}-{date}" + ("-smoke" if args.smoke else "")
    result = dict(card=card, date=date, torch=torch.__version__, smoke=args.smoke, rows=rows,
                  notes="hidden states (B, 768, 470) -> Decoder -> Vocos -> waveform; tflops and "
                        "hbm_gb_s use the Triton split schedule's FLOPs and bytes for every impl; "
                        "max_rel_err_vs_first = max|wav - wav_first_impl| / max|wav_first_impl|")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out_dir / f"{stem}.png", f"{card}, {dtype}, {frames} frames/utterance")

    print(f"\n{card}  {dtype}  {frames} frames ({audio_s:.2f} s) per utterance  -> {out_dir / stem}.json")
    print(f"{'impl':14s} {'batch':>5s} {'ms':>9s} {'audio-s/s':>11s} {'TFLOP/s':>8s} {'GB/s':>7s} "
          f"{'vs compile':>10s} {'err':>8s}")
    for r in rows:
        sp = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-"
        print(f"{r['impl']:14s} {r['batch']:5d} {r['ms']:9.2f} {r['audio_s_per_s']:11.0f} "
              f"{r['tflops']:8.1f} {r['hbm_gb_s']:7.0f} {sp:>10s} {r['max_rel_err_vs_first']:8.1e}")


if __name__ == "__main__":
    main()
