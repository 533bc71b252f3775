"""Ray Serve throughput: 1 vs 2 engine replicas in the same run, in audio seconds per wall second.

    python benchmarks/bench_ray.py                     # GPU machine, >= 2 GPUs: one per replica
    python benchmarks/bench_ray.py --gpus-per-replica 0.5   # one GPU shared by both replicas
    python benchmarks/bench_ray.py --smoke             # CPU: 2-layer random weights, tiny sizes

A local Ray cluster serves the app of chattts_vllm/serving/ray_app.py on loopback, first with one
engine replica, then (the app deleted and deployed again) with two. Each phase keeps
`--concurrency` requests per replica in flight and sends `--requests` requests per replica, so
every replica is equally loaded in both phases; every request asks for one sentence of exactly
`--frames` frames (min_new_token = max_new_token; 470 frames = 10 s of audio) as PCM, so the audio
per request is fixed and known. Random weights (official shapes) unless `--model` names a
checkpoint. Each phase warms up first (`--warmup` requests per replica: kernels autotuned for the
shapes, every replica reached).

On GPU the engine core runs in the replica process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, see
chattts_vllm/serving/inproc.py) and each replica holds one GPU. Where the time goes, per phase:
`synth_p50_s` is the time inside the engine replica (prepare, GPT, decode, encode: the
`X-Synthesis-Seconds` header), `overhead_p50_s` the rest of each request's latency (HTTP proxy,
ingress, Serve routing and queueing, client); `client_cpu` is the share of one core the load
generator used; `gpu_util` the mean utilisation of each GPU while measuring (nvidia-smi).

Writes benchmarks/results/ray-<card>-<date>.json (smoke: benchmarks/results/tmp/) and a plot;
prints one line per phase and the speedup last.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench_common import free_port, gpu_info

RESULTS = Path(__file__).resolve().parent / "results"
SR = 24000
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench_ray {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def card_name() -> str:
    """The first GPU's name with dashes."""
    return gpu_info()[0].replace(" ", "-")


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


class GpuSampler:
    """Mean utilisation of each GPU between start() and stop(), from `nvidia-smi -lms`."""

    def __init__(self, period_ms: int = 500):
        self.period_ms, self.proc, self.samples = period_ms, None, collections.defaultdict(list)

    def start(self) -> None:
        if not shutil.which("nvidia-smi"):
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
             f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                i, u = (int(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.samples[i].append(u)

    def stop(self) -> dict[str, float]:
        if self.proc is None:
            return {}
        self.proc.terminate()
        self.proc.wait()
        return {str(i): round(sum(v) / len(v), 1) for i, v in sorted(self.samples.items()) if v}


async def _load_part(url: str, n: int, concurrency: int, frames: int, seed0: int,
                     start_at: float) -> dict:
    """One client process's share: `n` requests, at most `concurrency` at a time (raw figures)."""
    import httpx

    body = dict(model="chattts", input="Benchmarking speech on Ray Serve.", voice="alloy",
                response_format="pcm", min_new_token=frames, max_new_token=frames)
    sem, lat, synth, audio = asyncio.Semaphore(concurrency), [], [], 0.0
    served: collections.Counter[str] = collections.Counter()

    async def one(client, i: int) -> None:
        nonlocal audio
        async with sem:
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/audio/speech", json={**body, "seed": seed0 + i})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            audio += len(r.content) / 2 / SR
            served[r.headers.get("x-replica-id", "?")] += 1
            if "x-synthesis-seconds" in r.headers:
                synth.append(float(r.headers["x-synthesis-seconds"]))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = time.process_time()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        end, cpu = time.time(), time.process_time() - cpu0
    return {"lat": lat, "synth": synth, "audio": audio, "served": dict(served), "end": end, "cpu": cpu}


def _run_part(url, n, concurrency, frames, seed0, start_at) -> dict:
    return asyncio.run(_load_part(url, n, concurrency, frames, seed0, start_at))


def _load(url: str, n: int, concurrency: int, frames: int, seed0: int, procs: int = 1) -> dict:
    """`n` requests, at most `concurrency` at a time, from `procs` client processes started
    together (one Python HTTP client tops out well below what two engines serve) -> wall time,
    audio seconds, latencies."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    procs = max(1, min(procs, concurrency, n))
    shares = [(n // procs + (k < n % procs), concurrency // procs + (k < concurrency % procs))
              for k in range(procs)]
    start_at = time.time() + 3.0
    if procs == 1:
        parts = [_run_part(url, n, concurrency, frames, seed0, start_at)]
    else:
        seeds = [seed0 + sum(m for m, _ in shares[:k]) for k in range(procs)]
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_run_part, url, m, c, frames, sd, start_at)
                    for (m, c), sd in zip(shares, seeds)]
            parts = [f.result() for f in futs]
    wall = max(p["end"] for p in parts) - start_at
    lat = [x for p in parts for x in p["lat"]]
    synth = [x for p in parts for x in p["synth"]]
    audio = sum(p["audio"] for p in parts)
    served: collections.Counter[str] = collections.Counter()
    for p in parts:
        served.update(p["served"])
    overhead = ([a - b for p in parts for a, b in zip(p["lat"], p["synth"])]
                if len(synth) == len(lat) else [])
    cpu = sum(p["cpu"] for p in parts)
    return {"requests": n, "concurrency": concurrency, "frames": frames, "client_procs": procs,
            "wall_s": round(wall, 3),
            "audio_s": round(audio, 3), "audio_s_per_s": round(audio / wall, 3),
            "requests_per_s": round(n / wall, 2),
            "p50_latency_s": _pct(lat, 0.5), "p95_latency_s": _pct(lat, 0.95),
            "synth_p50_s": _pct(synth, 0.5), "overhead_p50_s": _pct(overhead, 0.5),
            "overhead_p95_s": _pct(overhead, 0.95), "client_cpu": round(cpu / wall, 2),
            "replicas_seen": len(served), "served_by": dict(served)}


def _engine_kwargs(args, gpu: bool) -> dict:
    if not gpu:
        return dict(dtype="float32", max_model_len=1024, enforce_eager=True,
                    max_num_seqs=args.concurrency)
    return dict(dtype=args.dtype, max_model_len=1024, max_num_seqs=args.concurrency,
                gpu_memory_utilization=round(0.85 * min(1.0, args.gpus_per_replica), 2),
                enable_prefix_caching=False)


def _app_args(args, model: str, replicas: int, gpu: bool) -> dict:
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if args.inproc else {}
    actor = {"num_gpus": args.gpus_per_replica, "num_cpus": 1} if gpu else {"num_cpus": 1}
    actor["runtime_env"] = {"env_vars": env}
    return {"model": model, "num_replicas": replicas, "use_gpu": gpu,
            "engine_kwargs": _engine_kwargs(args, gpu), "ray_actor_options": actor,
            # Above what the clients keep in flight, so Serve's router never holds a request back
            # (it backs off and re-probes when a replica is full); vLLM's scheduler queues extras.
            "max_ongoing_requests": 2 * args.concurrency,
            "ingress": {"num_replicas": args.ingress_replicas,
                        "max_ongoing_requests": 4 * args.concurrency * max(args.replicas)}}


def run(args, model: str, on_row=lambda rows: None) -> list[dict]:
    import ray
    from ray import serve

    from chattts_vllm.serving.ray_app import build_app

    gpu = not args.smoke and card_name() != "cpu"
    ray.init(num_cpus=None if gpu else 2, include_dashboard=False,
             log_to_driver=args.verbose or gpu, object_store_memory=int(args.object_store_gb * 2**30))
    log(f"ray up: {ray.cluster_resources()}")
    need = max(args.replicas) * args.gpus_per_replica
    if gpu and ray.cluster_resources().get("GPU", 0) < need:
        raise SystemExit(f"{max(args.replicas)} replicas need {need:g} GPUs; Ray sees "
                         f"{ray.cluster_resources().get('GPU', 0):g}")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False})       # no line per request
    url, rows = f"http://127.0.0.1:{port}", []
    try:
        for replicas in args.replicas:
            t = time.perf_counter()
            log(f"deploying {replicas} engine replica(s)")
            serve.run(build_app(_app_args(args, model, replicas, gpu)), name="chattts",
                      route_prefix="/", logging_config={"enable_access_log": False})
            ready = time.perf_counter() - t
            log(f"{replicas} replica(s) ready after {ready:.1f} s; warm-up")
            warm = _load(url, args.warmup * replicas, args.warmup * replicas, args.frames, 10**6,
                         args.client_procs * replicas)
            log(f"warm-up: {warm['requests']} requests in {warm['wall_s']} s on "
                f"{warm['replicas_seen']} replica(s); measuring")
            sampler = GpuSampler()
            sampler.start()
            res = _load(url, args.requests * replicas, args.concurrency * replicas, args.frames, 0,
                        args.client_procs * replicas)
            row = {"replicas": replicas, **res, "gpu_util": sampler.stop(),
                   "deploy_s": round(ready, 1), "warmup_s": warm["wall_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            on_row(rows)                                  # a later phase may not finish
            serve.delete("chattts")                       # free the GPUs for the next phase
            log(f"{replicas} replica(s) done")
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

    base = rows[0]["audio_s_per_s"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    bars = ax.bar([str(r["replicas"]) for r in rows], [r["audio_s_per_s"] for r in rows])
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['audio_s_per_s']:.0f} (x{r['audio_s_per_s'] / base:.2f})",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xlabel("engine replicas")
    ax.set_ylabel("audio seconds per second")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: random weights, official shapes)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=1280, help="measured requests per replica")
    p.add_argument("--concurrency", type=int, default=256,
                   help="requests in flight per replica (also each engine's max_num_seqs)")
    p.add_argument("--warmup", type=int, default=64, help="warm-up requests per replica")
    p.add_argument("--frames", type=int, default=470, help="frames per request (470 = 10 s)")
    p.add_argument("--gpus-per-replica", type=float, default=1.0)
    p.add_argument("--ingress-replicas", type=int, default=4)
    p.add_argument("--client-procs", type=int, default=2,
                   help="HTTP client processes per engine replica (the load is split among them)")
    p.add_argument("--object-store-gb", type=float, default=4)
    p.add_argument("--mp", dest="inproc", action="store_false",
                   help="engine core in a child process (vLLM's default) instead of in the replica")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-layers", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="CPU, 2 layers, 8 requests of 24 frames")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.concurrency, args.warmup, args.frames, args.num_layers = 8, 8, 2, 24, 2
        args.ingress_replicas, args.object_store_gb = 1, 0.5
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import vllm

    from chattts_vllm.checkpoint import convert, write_random_asset

    card, date = ("cpu-smoke" if args.smoke else card_name()), dt.date.today().isoformat()
    out_dir = RESULTS / "tmp" if args.smoke else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ray-{card}-{date}.json"

    def write(rows: list[dict]) -> None:
        base = rows[0]["audio_s_per_s"]
        speedup = {str(r["replicas"]): round(r["audio_s_per_s"] / base, 3) for r in rows}
        path.write_text(json.dumps({
            "card": card, "date": date, "vllm": vllm.__version__, "frames": args.frames,
            "requests_per_replica": args.requests, "concurrency_per_replica": args.concurrency,
            "gpus_per_replica": args.gpus_per_replica, "ingress_replicas": args.ingress_replicas,
            "engine_core": "in replica process" if args.inproc else "child process",
            "weights": args.model or f"random, {args.num_layers} layers",
            "rows": rows, "speedup": speedup}, indent=1))
        _plot(path, rows, f"{card}, {date}: {args.frames} frames, {args.concurrency} in flight "
                          f"and {args.requests} requests per replica")

    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if model is None:
            write_random_asset(Path(d) / "asset", num_layers=args.num_layers, seed=0)
            model = str(convert(Path(d) / "asset", Path(d) / "model"))
            log(f"random checkpoint ({args.num_layers} layers) written")
        rows = run(args, model, write)

    base = rows[0]["audio_s_per_s"]
    speedup = {str(r["replicas"]): round(r["audio_s_per_s"] / base, 3) for r in rows}
    for r in rows:
        print(f"replicas={r['replicas']} audio_s_per_s={r['audio_s_per_s']:.2f} "
              f"(x{r['audio_s_per_s'] / base:.2f}) p50={r['p50_latency_s']:.2f}s "
              f"p95={r['p95_latency_s']:.2f}s synth_p50={r['synth_p50_s']}s "
              f"overhead_p50={r['overhead_p50_s']}s wall={r['wall_s']:.1f}s "
              f"client_cpu={r['client_cpu']} gpu_util={r['gpu_util']} served_by={r['served_by']}")
    print(f"speedup {speedup}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
