"""Speech endpoint under load: time to first audio and throughput vs concurrency.

Against a running server (`chattts-vllm serve MODEL`), each level runs `concurrency` clients in a
closed loop, each sending `--rounds` streamed requests (`stream_format: audio`, pcm) one after the
other. Per request: time to first audio byte (TTFA), real-time factor (wall time / audio seconds)
and stall time (a client that starts playing at the first byte and then waits whenever the next
bytes are late); per level: audio seconds produced per wall second. `--first-chunk-frames 0 24`
measures each level in each streaming mode: 0 is the exact stream (first audio after the decoders'
53-frame lookahead), F > 0 the low-latency first chunk after F frames (`stream_first_chunk_frames`).

    python benchmarks/bench_serving.py http://127.0.0.1:8000                       # 1 8 32 128 256
    python benchmarks/bench_serving.py http://127.0.0.1:8000 --concurrency 1 4 --rounds 1 --tag smoke
    python benchmarks/bench_serving.py --serve random --concurrency 1 64 --first-chunk-frames 0 24

`--serve MODEL` (a model folder, or `random` for a `--serve-layers`-layer random checkpoint) starts
`chattts-vllm serve` itself (extra flags in `--serve-args`; `--inproc` runs its engine core in the
server process), waits for /health, runs the sweep and stops it; its log goes next to the results.

Writes benchmarks/results/serving-<card>-<date>[-tag].json (+ .png) and prints a table last.
`--min-new-token`/`--max-new-token` fix the utterance length (random weights end early).
`--arrivals staggered` spreads the clients' starts over one request's duration, so that a level is
the steady state of that many streams instead of repeated bursts of simultaneous arrivals (the
default, `lockstep`, with equal-length requests); `--arrivals lockstep staggered` measures both.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from bench_common import free_port, gpu_info

SAMPLE_RATE = 24000
TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet "
        "green forest.")


def card_name() -> tuple[str, str]:
    """(full name, short slug) of the first GPU; the bench itself needs no CUDA."""
    name = gpu_info()[0]
    if name == "cpu":
        return "cpu", "cpu"
    slug = next((k for k in ("H200", "H100", "A100", "L40S", "B200") if k in name), name)
    return name, slug.lower().replace(" ", "")


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttfa, nbytes, play, stall = None, 0, 0.0, 0.0
    async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for chunk in r.aiter_bytes():
            if not chunk:
                continue
            now = time.perf_counter() - t0
            if ttfa is None:
                ttfa = play = now              # playback starts with the first byte
            elif now > play:
                stall += now - play            # the buffer ran dry before this chunk came
                play = now
            play += len(chunk) / 2 / SAMPLE_RATE
            nbytes += len(chunk)
    wall = time.perf_counter() - t0
    audio_s = nbytes / 2 / SAMPLE_RATE
    return {"ttfa_s": ttfa if ttfa is not None else wall, "wall_s": wall, "audio_s": audio_s,
            "stall_s": stall}


async def loop_lag(lags: list[float], stop: asyncio.Event, period: float = 1e-3) -> None:
    """How late this client's own event loop wakes up (seconds past each 1 ms sleep): a busy
    client delays every stream's first byte by as much, and the client-side TTFA includes it."""
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - t - period)


async def run_clients(url: str, body: dict, concurrency: int, rounds: int, workers: range,
                      arrivals: str, spread_s: float, start_at: float,
                      bar: tqdm | None = None) -> tuple[list[dict], list[float], float]:
    """Clients `workers` (of `concurrency`) from wall-clock time `start_at`: (request results,
    this event loop's wake-up lags, the time.time() its last request ended)."""
    staggered = arrivals == "staggered"
    results: list[dict] = []
    n = len(workers)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    lags: list[float] = []
    stop = asyncio.Event()
    monitor = asyncio.create_task(loop_lag(lags, stop))
    await asyncio.sleep(max(0.0, start_at - time.time()))

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def worker(w: int) -> None:
            if staggered:
                await asyncio.sleep(spread_s * w / concurrency)
            for k in range(rounds):
                seed = None if body.get("seed") is None else body["seed"] + w * rounds + k
                results.append({**await one_request(client, url, {**body, "seed": seed}),
                                "ramp": staggered and k == 0 and rounds > 1})
                if bar is not None:
                    bar.update()

        await asyncio.gather(*(worker(w) for w in workers))
        end = time.time()
    stop.set()
    await monitor
    return results, lags, end


def _client_process(url: str, body: dict, concurrency: int, rounds: int, workers: range,
                    arrivals: str, spread_s: float, start_at: float):
    return asyncio.run(run_clients(url, body, concurrency, rounds, workers, arrivals, spread_s, start_at))


def run_level(url: str, body: dict, concurrency: int, rounds: int, bar: tqdm,
              arrivals: str = "lockstep", spread_s: float = 0.0, procs: int = 1) -> dict:
    """One level. "staggered" arrivals: client w starts w / concurrency of `spread_s` late (one
    request's duration) and the latency figures skip each client's first request (the ramp), so
    they are the steady state of `concurrency` streams; "lockstep": all clients start together, and
    equal-length requests keep every round a burst of `concurrency` simultaneous arrivals.

    `procs` > 1 splits the clients over that many client processes (each its own event loop), so
    that one Python loop serialising 64 requests' sends and first reads does not add its own
    queueing to every stream's time to first audio."""
    staggered = arrivals == "staggered"
    procs = max(1, min(procs, concurrency))
    start_at = time.time() + (0.05 if procs == 1 else 1.0)
    if procs == 1:
        results, lags, end = asyncio.run(run_clients(url, body, concurrency, rounds, range(concurrency),
                                                     arrivals, spread_s, start_at, bar))
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(procs) as pool:
            parts = list(pool.map(_client_process, *zip(*[
                (url, body, concurrency, rounds, range(p, concurrency, procs), arrivals, spread_s,
                 start_at) for p in range(procs)])))
        results = [r for part in parts for r in part[0]]
        lags = [x for part in parts for x in part[1]]
        end = max(part[2] for part in parts)
        bar.update(len(results))
    wall = end - start_at
    lag = np.array(lags) * 1e3
    audio = sum(r.get("audio_s", 0.0) for r in results)
    errors = [r["error"] for r in results if "error" in r]
    results = [r for r in results if not r["ramp"]]          # latency: the steady state only
    ok = [r for r in results if "error" not in r]
    ttfa = np.array([r["ttfa_s"] for r in ok]) * 1e3
    rtf = np.array([r["wall_s"] / r["audio_s"] for r in ok if r["audio_s"] > 0])
    stall = np.array([r["stall_s"] for r in ok]) * 1e3
    pct = (lambda a, q: float(np.percentile(a, q)) if a.size else None)
    return dict(concurrency=concurrency, first_chunk_frames=body.get("stream_first_chunk_frames", 0),
                arrivals=arrivals, spread_s=spread_s if staggered else 0.0, client_procs=procs,
                requests=len(results), errors=len(errors), first_error=errors[0] if errors else None,
                ttfa_p50_ms=pct(ttfa, 50), ttfa_p95_ms=pct(ttfa, 95), ttfa_p99_ms=pct(ttfa, 99),
                ttfa_mean_ms=float(ttfa.mean()) if ttfa.size else None,
                client_loop_lag_p50_ms=pct(lag, 50), client_loop_lag_p99_ms=pct(lag, 99),
                rtf_p50=pct(rtf, 50), rtf_p99=pct(rtf, 99),
                stall_p50_ms=pct(stall, 50), stall_p95_ms=pct(stall, 95),
                stalled_frac=float((stall > 0).mean()) if stall.size else None,
                audio_s_per_s=audio / wall, audio_s_total=audio, wall_s=wall)


STAGES = ("prepare", "engine", "decode")
SERVER_SERIES = ("chattts_audio_coalesce_jobs_total", "chattts_audio_coalesce_calls_total",
                 "chattts_speech_time_to_first_audio_seconds_sum",
                 "chattts_speech_time_to_first_audio_seconds_count",
                 "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count",
                 *(f'chattts_speech_first_audio_stage_seconds_{k}{{stage="{s}"}}'
                   for s in STAGES for k in ("sum", "count")))


def server_series(url: str) -> dict[str, float]:
    """The server's own counters (its /metrics), to difference around a level; {} if unreadable."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = dict.fromkeys(SERVER_SERIES, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        labelled = line.rsplit(" ", 1)[0]
        for key in (name, labelled):           # plain series summed over labels; exact labelled ones
            if key in out:
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def _mean_ms(d: dict, histogram: str, labels: str = "") -> float | None:
    """Mean of a Prometheus histogram over the level, from its _sum and _count differences."""
    n = d[f"{histogram}_count{labels}"]
    return 1e3 * d[f"{histogram}_sum{labels}"] / n if n else None


def server_view(before: dict, after: dict) -> dict:
    """Per level, from the server's /metrics: the mean time to first audio and its stages (prepare,
    engine until the first chunk's frames, their decode), vLLM's own mean time to first token and
    inter-token latency (one token = one frame: the engine step as the requests saw it), and stream
    jobs per audio call (about the number of streams when the coalesced decode batches; 1 if not)."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in SERVER_SERIES}
    calls = d["chattts_audio_coalesce_calls_total"]
    view = dict(server_ttfa_mean_ms=_mean_ms(d, "chattts_speech_time_to_first_audio_seconds"),
                engine_ttft_mean_ms=_mean_ms(d, "vllm:time_to_first_token_seconds"),
                engine_itl_mean_ms=_mean_ms(d, "vllm:inter_token_latency_seconds"),
                audio_jobs_per_call=d["chattts_audio_coalesce_jobs_total"] / calls if calls else None)
    for s in STAGES:
        view[f"first_audio_{s}_mean_ms"] = _mean_ms(d, "chattts_speech_first_audio_stage_seconds",
                                                    f'{{stage="{s}"}}')
    return view


API_REQUEST = re.compile(r"\((?:ApiServer|APIServer)_?(\d*) pid=\d+\).*\"POST /v1/audio/speech")


def api_process_requests(log: Path | None) -> dict[str, int]:
    """Speech requests per API server process so far, from a served run's log (uvicorn's access
    lines carry vLLM's process tag); {} without a log. The difference around a level shows how
    its connections spread over `--api-server-count` processes."""
    if log is None or not log.exists():
        return {}
    counts: dict[str, int] = {}
    for m in API_REQUEST.finditer(log.read_text(errors="replace")):
        counts[m.group(1) or "0"] = counts.get(m.group(1) or "0", 0) + 1
    return counts


def _mode(f: int) -> str:
    return "exact" if not f else f"first chunk {f} frames"


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for f in sorted({r.get("first_chunk_frames", 0) for r in rows}):
        rs = [r for r in rows if r.get("first_chunk_frames", 0) == f and r["ttfa_p50_ms"] is not None]
        c = [r["concurrency"] for r in rs]
        line, = a.plot(c, [r["ttfa_p50_ms"] for r in rs], marker="o", label=f"{_mode(f)} p50")
        a.plot(c, [r["ttfa_p95_ms"] for r in rs], marker="x", linestyle="--", color=line.get_color(),
               label=f"{_mode(f)} p95")
        b.plot(c, [r["audio_s_per_s"] for r in rs], marker="o", label=_mode(f))
    a.axhline(150, color="grey", linewidth=0.8, linestyle=":")
    a.set_ylabel("time to first audio (ms)")
    b.set_ylabel("audio seconds / second")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextlib.contextmanager
def served(model: str, layers: int, extra: list[str], inproc: bool, log: Path, timeout: float):
    """`chattts-vllm serve` on a free port until the block ends; yields its URL."""
    with tempfile.TemporaryDirectory() as d:
        if model == "random":
            from chattts_vllm.checkpoint import convert, write_random_asset

            write_random_asset(Path(d) / "asset", num_layers=layers, seed=0)
            model = str(convert(Path(d) / "asset", Path(d) / "model"))
        port = free_port()
        argv = [sys.executable, "-c", "import sys; from chattts_vllm.cli import main; sys.exit(main())",
                "serve", model, "--port", str(port), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if inproc:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        print(f"starting {shlex.join(argv[3:])}{' (engine core in-process)' if inproc else ''}; log {log}",
              flush=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        url, t0 = f"http://127.0.0.1:{port}", time.time()
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited with {proc.returncode}:\n"
                                     + log.read_text(errors="replace")[-3000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.time() - t0 > timeout:
                    raise SystemExit(f"server not healthy after {timeout:.0f} s:\n"
                                     + log.read_text(errors="replace")[-3000:])
                time.sleep(1)
            print(f"server healthy after {time.time() - t0:.0f} s", flush=True)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", nargs="?", help="server base URL, e.g. http://127.0.0.1:8000 (not with --serve)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--first-chunk-frames", type=int, nargs="+", default=[0],
                    help="streaming modes to measure: 0 = exact, F = low-latency first chunk after F frames")
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--voice", default="alloy")
    ap.add_argument("--seed", type=int, default=0, help="per-request seeds start here (-1: random)")
    ap.add_argument("--min-new-token", type=int, default=None)
    ap.add_argument("--max-new-token", type=int, default=None)
    ap.add_argument("--card", default=None, help="name of the server's accelerator (default: nvidia-smi)")
    ap.add_argument("--tag", default="", help="suffix of the result file name, e.g. smoke")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--serve", default=None, metavar="MODEL",
                    help="start `chattts-vllm serve MODEL` (or a random checkpoint: 'random') for the run")
    ap.add_argument("--serve-layers", type=int, default=20, help="layers of the random checkpoint")
    ap.add_argument("--serve-args", default="", help="extra `chattts-vllm serve` flags, one string")
    ap.add_argument("--serve-timeout", type=float, default=420, help="seconds to wait for /health")
    ap.add_argument("--arrivals", nargs="+", choices=("lockstep", "staggered"), default=["lockstep"],
                    help="lockstep: all clients start together (equal-length requests keep each round "
                         "a burst); staggered: client starts spread over one request's duration (from "
                         "the warm-up), latency from each client's second request on")
    ap.add_argument("--client-procs", type=int, nargs="+", default=[1],
                    help="client processes a level's clients are split over (each value measured): "
                         "one Python event loop sending 64 requests at once queues them itself")
    ap.add_argument("--inproc", action="store_true",
                    help="with --serve: engine core in the server process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    args = ap.parse_args()
    if bool(args.url) == bool(args.serve):
        ap.error("give either a server URL or --serve MODEL")

    date = datetime.date.today().isoformat()
    card, slug = (args.card, args.card.lower()) if args.card else card_name()
    stem = f"serving-{slug}-{date}" + (f"-{args.tag}" if args.tag else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    server = (served(args.serve, args.serve_layers, shlex.split(args.serve_args), args.inproc,
                     args.out_dir / f"{stem}-server.log", args.serve_timeout)
              if args.serve else contextlib.nullcontext(args.url))
    args.server_log = args.out_dir / f"{stem}-server.log" if args.serve else None
    with server as url:
        rows, model, body = bench(url.rstrip("/"), args)

    result = dict(card=card, date=date, url=url, model=model, text_chars=len(args.text),
                  voice=args.voice, rounds=args.rounds, min_new_token=args.min_new_token,
                  max_new_token=args.max_new_token, served=bool(args.serve),
                  serve_args=args.serve_args if args.serve else None,
                  inproc=args.inproc if args.serve else None, arrivals=args.arrivals, rows=rows,
                  notes="closed loop: `concurrency` clients x `rounds` streamed pcm requests; "
                        "ttfa = first audio byte; rtf = request wall time / its audio seconds; stall = "
                        "time a client playing from its first byte would wait for late bytes; "
                        "audio_s_per_s = all audio seconds / level wall time; first_chunk_frames 0 = "
                        "exact stream, F = low-latency first chunk after F frames; server_ttfa_mean_ms "
                        "and audio_jobs_per_call come from the server's /metrics (the coalesced audio "
                        "decode: jobs per batched call); ttfa_mean_ms against server_ttfa_mean_ms "
                        "is the time outside the server's handler (HTTP, the client); "
                        "client_loop_lag_*: how late the client's own event loop wakes; client_procs: "
                        "client processes the level's clients were split over")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(rows, f"ChatTTS /v1/audio/speech on {card} ({date})", args.out_dir / f"{stem}.png")
    except ImportError:                              # a GPU box without matplotlib: JSON only
        print("matplotlib not installed: no plot")

    print(f"\n{'arrivals':>9} {'mode':>8} {'conc':>5} {'procs':>5} {'reqs':>5} {'err':>4} {'ttfa p50':>9} {'ttfa p95':>9} "
          f"{'mean':>6} {'srv':>5} {'lag99':>5} "
          f"{'stall p95':>9} {'rtf p50':>8} {'audio s/s':>10} {'jobs/call':>9}  server ms: "
          f"{'prep':>5} {'engine':>6} {'decode':>6} {'ttft':>5} {'itl':>5}")
    for r in rows:
        print(f"{r['arrivals']:>9} {'exact' if not r['first_chunk_frames'] else 'F=' + str(r['first_chunk_frames']):>8} "
              f"{r['concurrency']:>5} {r.get('client_procs', 1):>5} {r['requests']:>5} {r['errors']:>4} {r['ttfa_p50_ms'] or 0:>7.0f}ms "
              f"{r['ttfa_p95_ms'] or 0:>7.0f}ms {r.get('ttfa_mean_ms') or 0:>6.0f} "
              f"{r.get('server_ttfa_mean_ms') or 0:>5.0f} {r.get('client_loop_lag_p99_ms') or 0:>5.1f} "
              f"{r['stall_p95_ms'] or 0:>7.0f}ms {r['rtf_p50'] or 0:>8.3f} "
              f"{r['audio_s_per_s']:>10.2f} {r.get('audio_jobs_per_call') or 0:>9.1f}  {'':>10} "
              + " ".join(f"{r.get(k) or 0:>{w}.1f}" for k, w in (
                  ("first_audio_prepare_mean_ms", 5), ("first_audio_engine_mean_ms", 6),
                  ("first_audio_decode_mean_ms", 6), ("engine_ttft_mean_ms", 5), ("engine_itl_mean_ms", 5))))
    for r in rows:
        if len(r.get("requests_per_api_process") or []) > 1:
            print(f"requests per API process, {r['arrivals']} c={r['concurrency']} "
                  f"F={r['first_chunk_frames']} procs={r.get('client_procs', 1)}: "
                  f"{r['requests_per_api_process']}")
    print(f"wrote {args.out_dir / stem}.json (+ .png)")


def bench(url: str, args) -> tuple[list[dict], str, dict]:
    model = args.model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "input": args.text, "voice": args.voice, "response_format": "pcm",
            "stream_format": "audio", "seed": None if args.seed < 0 else args.seed}
    body.update({k: v for k, v in (("min_new_token", args.min_new_token),
                                    ("max_new_token", args.max_new_token)) if v is not None})
    rows = []
    modes = [{} if not f else {"stream_first_chunk_frames": f} for f in args.first_chunk_frames]
    # Warm-up, not measured: every (concurrency, mode) level once, so that the audio kernels' JIT
    # for each coalesced batch shape happens here, as it would in a server's first minutes.
    # A level's wall time here is also the span staggered arrivals spread the clients' starts over.
    wall = {}
    for c in args.concurrency:
        for m in modes:
            warm = run_level(url, {**body, **m}, c, 1, tqdm(disable=True))
            wall[c, m.get("stream_first_chunk_frames", 0)] = warm["wall_s"]
    total = (sum(args.concurrency) * args.rounds * len(modes) * len(args.arrivals)
             * len(args.client_procs))
    with tqdm(total=total, unit="req", desc="bench_serving") as bar:
        for c, m, a, procs in ((c, m, a, p) for c in args.concurrency for m in modes
                               for a in args.arrivals for p in args.client_procs):
            spread = wall[c, m.get("stream_first_chunk_frames", 0)] if a == "staggered" else 0.0
            before, seen = server_series(url), api_process_requests(args.server_log)
            rows.append(run_level(url, {**body, **m}, c, args.rounds, bar, a, spread, procs))
            rows[-1].update(server_view(before, server_series(url)))
            if args.server_log is not None:
                time.sleep(0.5)                  # the last access lines
                now = api_process_requests(args.server_log)
                rows[-1]["requests_per_api_process"] = sorted(
                    (now[k] - seen.get(k, 0) for k in now if now[k] > seen.get(k, 0)), reverse=True)
            bar.set_postfix(c=c, f=rows[-1]["first_chunk_frames"], a=a,
                            ttfa_p50=f"{rows[-1]['ttfa_p50_ms'] or 0:.0f}ms")
    return rows, model, body


if __name__ == "__main__":
    main()
