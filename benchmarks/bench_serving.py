"""Speech endpoint under load: time to first audio and throughput vs concurrency.

Against a running server (`chattts-vllm serve MODEL`), each level runs `concurrency` clients in a
closed loop, each sending `--rounds` streamed requests (`stream_format: audio`, pcm) one after the
other. Per request: time to first audio byte (TTFA) and real-time factor (wall time / audio
seconds); per level: audio seconds produced per wall second.

    python benchmarks/bench_serving.py http://127.0.0.1:8000                       # 1 8 32 128 256
    python benchmarks/bench_serving.py http://127.0.0.1:8000 --concurrency 1 4 --rounds 1 --tag smoke

Writes benchmarks/results/serving-<card>-<date>[-tag].json (+ .png) and prints a table last.
`--min-new-token`/`--max-new-token` fix the utterance length (random weights end early).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

SAMPLE_RATE = 24000
TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet "
        "green forest.")


def card_name() -> tuple[str, str]:
    """(full name, short slug) of the first GPU, from nvidia-smi; the bench itself needs no CUDA."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        if out:
            name = out[0].strip()
            slug = next((k for k in ("H200", "H100", "A100", "L40S", "B200") if k in name), name)
            return name, slug.lower().replace(" ", "")
    return "cpu", "cpu"


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttfa, nbytes = None, 0
    async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for chunk in r.aiter_bytes():
            if chunk and ttfa is None:
                ttfa = time.perf_counter() - t0
            nbytes += len(chunk)
    wall = time.perf_counter() - t0
    audio_s = nbytes / 2 / SAMPLE_RATE
    return {"ttfa_s": ttfa if ttfa is not None else wall, "wall_s": wall, "audio_s": audio_s}


async def run_level(url: str, body: dict, concurrency: int, rounds: int, bar: tqdm) -> dict:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def worker(w: int) -> None:
            for k in range(rounds):
                seed = None if body.get("seed") is None else body["seed"] + w * rounds + k
                results.append(await one_request(client, url, {**body, "seed": seed}))
                bar.update()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttfa = np.array([r["ttfa_s"] for r in ok]) * 1e3
    rtf = np.array([r["wall_s"] / r["audio_s"] for r in ok if r["audio_s"] > 0])
    audio = sum(r["audio_s"] for r in ok)
    pct = (lambda a, q: float(np.percentile(a, q)) if a.size else None)
    return dict(concurrency=concurrency, requests=len(results), errors=len(errors),
                first_error=errors[0] if errors else None,
                ttfa_p50_ms=pct(ttfa, 50), ttfa_p99_ms=pct(ttfa, 99),
                rtf_p50=pct(rtf, 50), rtf_p99=pct(rtf, 99),
                audio_s_per_s=audio / wall, audio_s_total=audio, wall_s=wall)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["ttfa_p50_ms"] for r in rows], marker="o", label="p50")
    a.plot(c, [r["ttfa_p99_ms"] for r in rows], marker="o", label="p99")
    a.set_ylabel("time to first audio (ms)")
    b.plot(c, [r["audio_s_per_s"] for r in rows], marker="o")
    b.set_ylabel("audio seconds / second")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--voice", default="alloy")
    ap.add_argument("--seed", type=int, default=0, help="per-request seeds start here (-1: random)")
    ap.add_argument("--min-new-token", type=int, default=None)
    ap.add_argument("--max-new-token", type=int, default=None)
    ap.add_argument("--card", default=None, help="name of the server's accelerator (default: nvidia-smi)")
    ap.add_argument("--tag", default="", help="suffix of the result file name, e.g. smoke")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    url = args.url.rstrip("/")
    model = args.model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "input": args.text, "voice": args.voice, "response_format": "pcm",
            "stream_format": "audio", "seed": None if args.seed < 0 else args.seed}
    body.update({k: v for k, v in (("min_new_token", args.min_new_token),
                                    ("max_new_token", args.max_new_token)) if v is not None})
    card, slug = (args.card, args.card.lower()) if args.card else card_name()

    asyncio.run(run_level(url, body, 1, 1, tqdm(disable=True)))          # warm-up
    rows = []
    with tqdm(total=sum(args.concurrency) * args.rounds, unit="req", desc="bench_serving") as bar:
        for c in args.concurrency:
            rows.append(asyncio.run(run_level(url, body, c, args.rounds, bar)))
            bar.set_postfix(c=c, ttfa_p50=f"{rows[-1]['ttfa_p50_ms'] or 0:.0f}ms")

    date = datetime.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"serving-{slug}-{date}" + (f"-{args.tag}" if args.tag else "")
    result = dict(card=card, date=date, url=url, model=model, text_chars=len(args.text),
                  voice=args.voice, rounds=args.rounds, min_new_token=args.min_new_token,
                  max_new_token=args.max_new_token, rows=rows,
                  notes="closed loop: `concurrency` clients x `rounds` streamed pcm requests; "
                        "ttfa = first audio byte; rtf = request wall time / its audio seconds; "
                        "audio_s_per_s = all audio seconds / level wall time")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(rows, f"ChatTTS /v1/audio/speech on {card} ({date})", args.out_dir / f"{stem}.png")
    except ImportError:                              # a GPU box without matplotlib: JSON only
        print("matplotlib not installed: no plot")

    print(f"\n{'conc':>5} {'reqs':>5} {'err':>4} {'ttfa p50':>9} {'ttfa p99':>9} {'rtf p50':>8} "
          f"{'audio s/s':>10}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} {r['ttfa_p50_ms'] or 0:>7.0f}ms "
              f"{r['ttfa_p99_ms'] or 0:>7.0f}ms {r['rtf_p50'] or 0:>8.3f} {r['audio_s_per_s']:>10.2f}")
    print(f"wrote {args.out_dir / stem}.json (+ .png)")


if __name__ == "__main__":
    main()
