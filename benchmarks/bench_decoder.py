"""Audio back end throughput: GPT hidden states → Decoder → Vocos → 24 kHz waveform.

Batches of 10 s utterances (470 GPT frames) through PyTorch eager, torch.compile and the Triton
kernels, in one run, on the same random weights in the official layout.

    python benchmarks/bench_decoder.py                      # one H100: bf16, batches 32 and 128
    python benchmarks/bench_decoder.py --profile            # + top-25 CUDA kernels of one Triton pass
    python benchmarks/bench_decoder.py --smoke              # CPU smoke check, tiny model

Implementations (--impls): eager; compile (torch.compile, --compile-mode, default "default": the
acceptance baseline); triton (the Triton kernels, split MLP); triton-graph (the same, replayed from a
CUDA graph through the library's per-shape GraphCache, audio/graphs.py); optional extras
compile-reduce-overhead, compile-max-autotune-nc (mode max-autotune-no-cudagraphs, slow to compile)
and triton-fused (fused-MLP kernel).

Reports audio seconds per second, achieved TFLOP/s and an effective memory bandwidth (bytes of the
Triton schedule — each kernel's reads and writes plus the weights — over time, the same numerator
for every implementation), each implementation's max relative error vs eager, and a per-stage
breakdown (decoder: hidden → mel; backbone: mel → Vocos features; head: features → spectrum →
ISTFT), each stage timed alone (compile: each stage compiled alone).
Writes benchmarks/results/decoder-<card>-<date>.json (+ .png) and prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from chattts_vllm.audio.checkpoint import (decoder_shapes, load_decoder, load_vocos,
                                           random_audio_state_dicts, random_state_dict, vocos_shapes)
from chattts_vllm.audio.convnext import set_backend, triton_kernels
from chattts_vllm.audio.graphs import enable_cuda_graphs

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
    flops += 2 * rows * bb.embed.out_channels * (n_fft + 2)
    bytes_ += rows * bb.embed.out_channels * elem                   # head GEMM reads the features,
    bytes_ += rows * (n_fft + 2) * 4 * 2 + rows * n_fft * 4 * 2     # writes the fp32 spectrum; irfft
    bytes_ += batch * frames * 2 * HOP * 4                          # r/w, overlap-add r + samples w
    bytes_ += sum(p.numel() * p.element_size() for m in (dec, voc) for p in m.parameters())
    return flops, bytes_


COMPILE_EXTRAS = {"compile-reduce-overhead": "reduce-overhead",
                  "compile-max-autotune-nc": "max-autotune-no-cudagraphs"}


def stage_fns(d, v, dtype):
    """The three stages of one decode: decoder, Vocos backbone, ISTFT head (spectrum + ISTFT)."""
    return {"decoder": lambda h: d(h),
            "backbone": lambda mel: v.backbone(mel.transpose(1, 2).to(dtype)),
            "head": lambda feat: v.head(feat)}


def implementations(dec, voc, names: list[str], compile_mode: str, dtype):
    """name → (callable(hidden (B, 768, T)) → waveform, stage callables or None, compile mode or None),
    each on its own copy of the modules."""
    def modules(backend: str):
        return set_backend(copy.deepcopy(dec), backend), set_backend(copy.deepcopy(voc), backend)

    def with_mlp(fn, mlp):
        def run(x):
            triton_kernels("convnext").MLP_MODE = mlp
            return fn(x)
        return run

    impls = {}
    for name in names:
        if name == "eager":
            d, v = modules("native")
            impls[name] = (lambda h, d=d, v=v: v(d(h)), stage_fns(d, v, dtype), None)
        elif name == "compile" or name in COMPILE_EXTRAS:
            mode = compile_mode if name == "compile" else COMPILE_EXTRAS[name]
            d, v = modules("native")
            full = torch.compile(lambda h, d=d, v=v: v(d(h)), mode=mode, dynamic=False)
            stages = None
            if name == "compile":      # extras: whole model only (their compiles are slow)
                stages = {k: torch.compile(f, mode=mode, dynamic=False)
                          for k, f in stage_fns(d, v, dtype).items()}
            impls[name] = (full, stages, mode)
        elif name in ("triton", "triton-fused"):
            mlp = "fused" if name == "triton-fused" else "split"
            d, v = modules("triton")
            impls[name] = (with_mlp(lambda h, d=d, v=v: v(d(h)), mlp),
                           {k: with_mlp(f, mlp) for k, f in stage_fns(d, v, dtype).items()}, None)
        elif name == "triton-graph":
            d, v = modules("triton")
            enable_cuda_graphs(d, min_calls=1), enable_cuda_graphs(v, min_calls=1)
            impls[name] = (with_mlp(lambda h, d=d, v=v: v(d(h)), "split"), None, None)
        else:
            raise ValueError(name)
    return impls


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


def autotune_choices() -> dict[str, str]:
    """The config each Triton autotuner picked, per key (empty with CHATTTS_TRITON_AUTOTUNE=0)."""
    k = triton_kernels("convnext")
    out = {}
    for name in ("_linear_tma_tuned", "_conv_tma_tuned", "_conv_gemm_tuned", "_mlp_tma_tuned", "_mlp_tuned"):
        tuner = getattr(k, name, None)
        for key, cfg in (getattr(tuner, "cache", None) or {}).items():
            out[f"{name[1:-6]} {key}"] = str(cfg)
    return out


def profile_top(fn, x, n: int = 25) -> list[dict]:
    """One call of fn under torch.profiler: the n CUDA kernels with the largest total time."""
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    rows = []
    events = list(prof.key_averages())
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    for e in kernels or events:          # kernel rows only: an aten op's row repeats its kernels' time
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append(dict(kernel=e.key, calls=e.count, total_us=t))
    total = sum(r["total_us"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["total_us"])
    for r in rows:
        r["pct"] = 100 * r["total_us"] / total
    print(f"\ntop {n} CUDA kernels, one call, {total / 1e3:.2f} ms of kernel time in all:")
    print(f"{'us':>9s} {'%':>5s} {'calls':>5s}  kernel")
    for r in rows[:n]:
        print(f"{r['total_us']:9.0f} {r['pct']:5.1f} {r['calls']:5d}  {r['kernel'][:110]}")
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--frames", type=int, default=None, help="GPT frames per utterance (470 = 10 s)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ap.add_argument("--impls", nargs="+", default=None,
                    help="eager compile triton triton-graph (default; CPU: eager) and extras "
                         "compile-reduce-overhead compile-max-autotune-nc triton-fused")
    ap.add_argument("--compile-mode", default="default", help='torch.compile mode of the "compile" row')
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler on one call per --profile-impls: top-25 CUDA kernels")
    ap.add_argument("--profile-batch", type=int, default=None,
                    help="the batch to profile (default: 32 if swept, else the first)")
    ap.add_argument("--profile-impls", nargs="+", default=["triton"])
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
    names = args.impls or (["eager", "compile", "triton", "triton-graph"] if device.type == "cuda"
                           else ["eager"])
    out_dir = args.out_dir or Path(__file__).parent / "results" / ("tmp" if args.smoke else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    card, slug = card_name(device)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    dec, voc = build(args.smoke, device, dtype)
    impls = implementations(dec, voc, names, args.compile_mode, dtype)
    audio_s = (2 * frames - 1) * HOP / SAMPLE_RATE
    rows, profiles = [], {}
    with torch.inference_mode():
        for batch in batches:
            hidden = torch.randn(batch, dec.frame_dim, frames, device=device, dtype=dtype)
            flops, nbytes = cost_model(dec, voc, batch, frames, torch.empty(0, dtype=dtype).element_size())
            ref = None
            for name, (fn, stages, mode) in impls.items():
                t0 = time.perf_counter()
                fn(hidden)                                   # first call: compile / autotune / capture
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                sec, wav = time_it(fn, hidden, args.warmup, args.iters, device, f"{name} B={batch}")
                ref = wav.float() if ref is None else ref
                err = ((wav.float() - ref).abs().max() / ref.abs().max()).item()
                stage_ms = None
                if stages is not None and not args.no_stages:
                    stage_ms, x = {}, hidden
                    for stage, sfn in stages.items():
                        sfn(x)
                        st, x = time_it(sfn, x, 1, args.iters, device, f"{name} {stage} B={batch}")
                        stage_ms[stage] = st * 1e3
                rows.append(dict(impl=name, batch=batch, frames=frames, dtype=str(dtype).split(".")[-1],
                                 ms=sec * 1e3, audio_s_per_s=batch * audio_s / sec,
                                 tflops=flops / sec / 1e12, hbm_gb_s=nbytes / sec / 1e9,
                                 first_call_s=first_s, max_rel_err_vs_first=err,
                                 cuda_graph=name == "triton-graph" or mode == "reduce-overhead",
                                 compile_mode=mode, stages_ms=stage_ms))
            want = args.profile_batch or (32 if 32 in batches else batches[0])
            if args.profile and device.type == "cuda" and batch == want:
                for name in args.profile_impls:
                    if name in impls:
                        print(f"\n== profile: {name}, batch {batch}")
                        profiles[name] = dict(batch=batch, top=profile_top(impls[name][0], hidden))
    triton_kernels("tune_cache").save()              # autotune picks on disk for the next process
    for r in rows:
        base = next((b for b in rows if b["impl"] == "compile" and b["batch"] == r["batch"]), None)
        r["speedup_vs_compile"] = base["ms"] / r["ms"] if base else None

    date = datetime.date.today().isoformat()
    stem = f"decoder-{slug}-{date}" + ("-smoke" if args.smoke else "")
    tuned = autotune_choices() if any(n.startswith("triton") for n in names) else {}
    result = dict(card=card, date=date, torch=torch.__version__, smoke=args.smoke,
                  compile_mode=args.compile_mode,
                  triton_autotune=os.environ.get("CHATTTS_TRITON_AUTOTUNE", "1") != "0",
                  rows=rows, autotune=tuned, profile=profiles or None,
                  wall_s=time.perf_counter() - t_start,
                  notes="hidden states (B, 768, 470) -> Decoder -> Vocos -> waveform; tflops and "
                        "hbm_gb_s use the Triton schedule's FLOPs and bytes for every impl; "
                        "max_rel_err_vs_first = max|wav - wav_first_impl| / max|wav_first_impl|; "
                        "speedup_vs_compile is against the 'compile' row (torch.compile, mode "
                        "compile_mode); stages_ms: each stage timed alone")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out_dir / f"{stem}.png", f"{card}, {dtype}, {frames} frames/utterance")

    if tuned:
        print("\nautotuner picks:")
        for key, cfg in tuned.items():
            print(f"  {key}: {cfg}")
    if not args.no_stages:
        print(f"\nper-stage ms (each stage alone){'':4s}{'decoder':>9s} {'backbone':>9s} {'head':>9s} {'sum':>9s}")
        for r in rows:
            if r["stages_ms"]:
                st = r["stages_ms"]
                print(f"  {r['impl']:24s} B={r['batch']:<4d} {st['decoder']:9.2f} {st['backbone']:9.2f} "
                      f"{st['head']:9.2f} {sum(st.values()):9.2f}")
    print(f"\n{card}  {dtype}  {frames} frames ({audio_s:.2f} s) per utterance  -> {out_dir / stem}.json"
          f"  ({time.perf_counter() - t_start:.0f} s)")
    print(f"{'impl':24s} {'batch':>5s} {'ms':>9s} {'audio-s/s':>11s} {'TFLOP/s':>8s} {'GB/s':>7s} "
          f"{'vs compile':>10s} {'err':>8s} {'first s':>7s}")
    for r in rows:
        sp = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-"
        print(f"{r['impl']:24s} {r['batch']:5d} {r['ms']:9.2f} {r['audio_s_per_s']:11.0f} "
              f"{r['tflops']:8.1f} {r['hbm_gb_s']:7.0f} {sp:>10s} {r['max_rel_err_vs_first']:8.1e} "
              f"{r['first_call_s']:7.1f}")


if __name__ == "__main__":
    main()
