"""One ChatTTS code-pass sampling step (B requests x 4 codebooks x 626 codes) on one GPU: the fused
CUDA kernel (chattts_vllm.ops.sample_codebooks) vs its twin (gpt.sampling.sample_frames) eager and
under torch.compile (dynamic shapes, one compile).

Per step = CUDA-event time over `--iters` back-to-back calls after warm-up, launch overhead included.
Checks that kernel and eager twin return the same codes at every batch. Writes
benchmarks/results/sample-codebooks-<card>-<date>.json (card, date, rows: impl, batch, us_per_step)
and a .png beside it; prints a table. About a minute on an H100 (most of it the compile).

    python benchmarks/kernels/bench_sample_codebooks.py [--batches 1 64 256 512 1024] [--no-compile]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from pathlib import Path

import torch

from chattts_vllm import ops
from chattts_vllm.config import AUDIO_EOS, NUM_AUDIO_TOKENS, NUM_VQ, REPETITION_WINDOW
from chattts_vllm.gpt import sampling

RESULTS = Path(__file__).resolve().parents[1] / "results"


def make_batch(b: int, device: str = "cuda") -> dict:
    """Upstream defaults (temperature 0.3, top-p 0.7, top-k 20, penalty 1.05) with full windows."""
    g = torch.Generator().manual_seed(b)
    batch = dict(
        logits=torch.randn(b, NUM_VQ, NUM_AUDIO_TOKENS, generator=g) * 3,
        history=torch.randint(0, 64, (b, NUM_VQ, REPETITION_WINDOW), generator=g),
        temperature=torch.full((b, NUM_VQ), 0.3),
        top_p=torch.full((b,), 0.7),
        top_k=torch.full((b,), 20, dtype=torch.int64),
        penalty=torch.full((b,), 1.05),
        mask_eos=torch.zeros(b, dtype=torch.bool),
        seed=torch.randint(0, 2**62, (b,), generator=g),
        counter=torch.randint(0, 2048, (b,), generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}


def time_us(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def card_name() -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    for short in ("h200", "h100", "b200", "a100", "l40s", "l4"):
        if short in slug.split("-"):
            return short
    return slug


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [(r["batch"], r["us_per_step"]) for r in rows if r["impl"] == impl]
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="requests per step (x4 codebooks)",
           ylabel="us per sampling step", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 512, 1024])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile twin")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert ops.HAS_CUDA_OPS, "build csrc first: pip install --no-build-isolation --no-deps -e ."

    def kernel(batch):
        return ops.sample_codebooks(**batch, eos_id=AUDIO_EOS)

    def twin(batch):
        return sampling.sample_frames(**batch, eos_id=AUDIO_EOS)

    impls = {"cuda kernel": kernel, "twin eager": twin}
    if not args.no_compile:
        compiled = torch.compile(sampling.sample_frames, dynamic=True)
        impls["twin compiled"] = lambda batch: compiled(**batch, eos_id=AUDIO_EOS)

    rows, match = [], {}
    for b in args.batches:
        batch = make_batch(b)
        match[b] = bool(torch.equal(kernel(batch), twin(batch)))
        for name, fn in list(impls.items()):
            try:
                us = time_us(lambda: fn(batch), args.iters)
            except Exception as e:  # a failing compile must not cost the other numbers
                print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                del impls[name]
                continue
            rows.append(dict(impl=name, batch=b, us_per_step=round(us, 2)))

    card, date = card_name(), dt.date.today().isoformat()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'batch':>6} " + " ".join(f"{n:>14}" for n in impls) + "   codes kernel == twin")
    for b in args.batches:
        us = {r["impl"]: r["us_per_step"] for r in rows if r["batch"] == b}
        print(f"{b:>6} " + " ".join(f"{us.get(n, float('nan')):>11.1f} us" for n in impls)
              + f"   {match[b]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sample-codebooks-{card}-{date}.json"
    out.write_text(json.dumps(dict(card=card, date=date, device=torch.cuda.get_device_name(),
                                   torch=torch.__version__, iters=args.iters,
                                   codes_match_twin={str(b): m for b, m in match.items()},
                                   rows=rows), indent=2) + "\n")
    plot(rows, out.with_suffix(".png"), f"ChatTTS 4-codebook sampling step, {card}")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    if not all(match.values()):
        raise SystemExit("kernel and twin disagree: run pytest -m gpu tests/kernels/test_sample_codebooks.py")


if __name__ == "__main__":
    main()
