"""Ray Serve throughput: 1 vs 2 engine replicas in the same run, in audio seconds per wall second.

    python benchmarks/bench_ray.py                     # GPU machine, >= 2 GPUs: one per replica
    python benchmarks/bench_ray.py --gpus-per-replica 0.5   # one GPU shared by both replicas
    python benchmarks/bench_ray.py --smoke             # CPU: 2-layer random weights, tiny sizes

A local Ray cluster serves the app of chattts_vllm/serving/ray_app.py on loopback, first with one
engine replica, then with two. Each phase sends `--requests` speech requests from `--concurrency`
HTTP clients; every request asks for one sentence of exactly `--frames` frames (min_new_token =
max_new_token; 470 frames = 10 s of audio) as PCM, so the audio per request is fixed and known.
Random weights (official shapes) unless `--model` names a checkpoint. A warm-up round per phase
runs first.

Writes benchmarks/results/ray-<card>-<date>.json (smoke: benchmarks/results/tmp/) and a plot;
prints one line per phase.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import RESULTS, card_name  # noqa: E402

SR = 24000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, n: int, concurrency: int, frames: int, seed0: int) -> dict:
    """`n` requests, at most `concurrency` at a time -> wall time, audio seconds, latencies."""
    import httpx

    body = dict(model="chattts", input="Benchmarking speech on Ray Serve.", voice="alloy",
                response_format="pcm", min_new_token=frames, max_new_token=frames)
    sem, lat, audio = asyncio.Semaphore(concurrency), [], 0.0
    replicas: set[str] = set()

    async def one(client, i: int) -> None:
        nonlocal audio
        async with sem:
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/audio/speech", json={**body, "seed": seed0 + i})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            audio += len(r.content) / 2 / SR
            replicas.add(r.headers.get("x-replica-id", "?"))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": n, "concurrency": concurrency, "frames": frames, "wall_s": round(wall, 3),
            "audio_s": round(audio, 3), "audio_s_per_s": round(audio / wall, 3),
            "p50_latency_s": round(lat[len(lat) // 2], 3),
            "p95_latency_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
            "replicas_seen": len(replicas)}


def _engine_kwargs(args, gpu: bool) -> dict:
    if not gpu:
        return dict(dtype="float32", max_model_len=1024, enforce_eager=True,
                    max_num_seqs=args.concurrency)
    return dict(dtype=args.dtype, max_model_len=1024, max_num_seqs=args.concurrency,
                gpu_memory_utilization=round(0.85 * min(1.0, args.gpus_per_replica), 2),
                enable_prefix_caching=False)


def run(args, model: str) -> list[dict]:
    import ray
    from ray import serve

    from chattts_vllm.serving.ray_app import build_app

    gpu = not args.smoke and card_name() != "cpu"
    ray.init(num_cpus=None if gpu else 2, include_dashboard=False, log_to_driver=args.verbose)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url, rows = f"http://127.0.0.1:{port}", []
    actor = {"num_gpus": args.gpus_per_replica, "num_cpus": 1} if gpu else {"num_cpus": 1}
    try:
        for replicas in args.replicas:
            t = time.perf_counter()
            serve.run(build_app({"model": model, "num_replicas": replicas, "use_gpu": gpu,
                                 "engine_kwargs": _engine_kwargs(args, gpu),
                                 "ray_actor_options": actor,
                                 "max_ongoing_requests": args.concurrency}),
                      name="chattts", route_prefix="/")
            ready = time.perf_counter() - t
            asyncio.run(_load(url, 2 * replicas, 2 * replicas, args.frames, 10**6))    # warm-up
            row = {"replicas": replicas, **asyncio.run(
                _load(url, args.requests, args.concurrency, args.frames, 0)), "deploy_s": round(ready, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def _plot(path: Path, rows: list[dict], title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.bar([str(r["replicas"]) for r in rows], [r["audio_s_per_s"] for r in rows])
    ax.set_xlabel("engine replicas")
    ax.set_ylabel("audio seconds per second")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: random weights, official shapes)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=256, help="clients in flight (all replicas)")
    p.add_argument("--frames", type=int, default=470, help="frames per request (470 = 10 s)")
    p.add_argument("--gpus-per-replica", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-layers", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="CPU, 2 layers, 8 requests of 24 frames")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.concurrency, args.frames, args.num_layers = 8, 8, 24, 2
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from chattts_vllm.checkpoint import convert, write_random_asset

    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if model is None:
            write_random_asset(Path(d) / "asset", num_layers=args.num_layers, seed=0)
            model = str(convert(Path(d) / "asset", Path(d) / "model"))
        rows = run(args, model)

    import vllm

    card, date = ("cpu-smoke" if args.smoke else card_name()), dt.date.today().isoformat()
    out_dir = RESULTS / "tmp" if args.smoke else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ray-{card}-{date}.json"
    path.write_text(json.dumps({"card": card, "date": date, "vllm": vllm.__version__,
                                "gpus_per_replica": args.gpus_per_replica,
                                "weights": args.model or f"random, {args.num_layers} layers",
                                "rows": rows}, indent=1))
    _plot(path, rows, f"{card}, {date}, {args.frames} frames x {args.requests} requests")
    base = rows[0]["audio_s_per_s"]
    for r in rows:
        print(f"replicas={r['replicas']} audio_s_per_s={r['audio_s_per_s']:.2f} "
              f"(x{r['audio_s_per_s'] / base:.2f}) p50={r['p50_latency_s']:.2f}s "
              f"p95={r['p95_latency_s']:.2f}s wall={r['wall_s']:.1f}s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
