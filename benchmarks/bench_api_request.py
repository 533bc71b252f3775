"""The API server's own work per speech request, before the engine sees it (CPU only, no engine).

In a burst, each API process handles its share of the new streams one after the other on its event
loop, so this cost sets how far apart their submissions land: the H200 server timeline of
2026-11-29 showed one process's 11 requests submitted 3 to 48 ms after the burst began. Timed
here: parsing the body, `SpeechService.prepare` (text normalisation, voice, prompt), `start` (the
stream's request copy) and what vLLM's front end does with the parameters (one more deep copy,
then msgpack), for the speaker in its wire form (float32 bytes) and, for comparison, as the list of
768 floats it used to be.

    python benchmarks/bench_api_request.py [--requests 300]

Writes benchmarks/results/api-request-cpu-<date>.json; prints a table last.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"model": "chattts", "input": ("The quick brown fox jumps over the lazy dog, and then it runs "
                                      "far away into the quiet green forest."),
        "voice": "alloy", "response_format": "pcm", "stream_format": "audio", "seed": 5,
        "min_new_token": 235, "max_new_token": 235, "stream_first_chunk_frames": 6}


class _IdleEngine:
    """Stands in for the engine client: a stream's task waits forever, nothing is generated."""

    async def generate(self, *args, **kwargs):
        await asyncio.sleep(3600)
        yield None


def _as_list(prepared) -> None:
    """The old wire form: the speaker as 768 Python floats."""
    import numpy as np

    for ep in prepared.requests:
        args = ep.sampling_params.extra_args["chattts"]
        if isinstance(args.get("speaker"), bytes):
            args["speaker"] = np.frombuffer(args["speaker"], "<f4").tolist()


async def _time(svc, n: int, speaker: str) -> dict[str, float]:
    from vllm.v1.serial_utils import MsgpackEncoder

    from chattts_vllm.serving.protocol import parse_speech_request

    body, enc = json.dumps(BODY).encode(), MsgpackEncoder()
    spent = dict(parse=0.0, prepare=0.0, start=0.0, vllm_front=0.0)
    jobs = []
    for i in range(n):
        t0 = time.perf_counter()
        req = parse_speech_request(body, ["chattts"])
        t1 = time.perf_counter()
        prepared = await svc.prepare(req, f"bench-{speaker}-{i}")
        if speaker == "list":
            _as_list(prepared)
        t2 = time.perf_counter()
        job = svc.start(prepared)
        t3 = time.perf_counter()
        for ep in prepared.requests:          # AsyncLLM: process_inputs clones, then msgpack
            enc.encode(ep.sampling_params.clone())
        t4 = time.perf_counter()
        jobs.append(job)
        for k, a, b in (("parse", t0, t1), ("prepare", t1, t2), ("start", t2, t3), ("vllm_front", t3, t4)):
            spent[k] += b - a
    for job in jobs:
        job.close()
    out = {k: v / n * 1e3 for k, v in spent.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    os.environ.setdefault("CHATTTS_VLLM_AUDIO_WARMUP", "0")
    os.environ.setdefault("CHATTTS_VLLM_AUDIO_DEVICE", "cpu")
    from chattts_vllm.checkpoint import convert, write_random_asset
    from chattts_vllm.serving.service import SpeechService

    tmp = Path(tempfile.mkdtemp())
    write_random_asset(tmp / "asset", num_layers=1, seed=0)
    svc = SpeechService(_IdleEngine(), convert(tmp / "asset", tmp / "model"), ["chattts"], 1024)

    async def run() -> dict[str, dict[str, float]]:
        await _time(svc, 20, "bytes")                      # warm-up (imports, caches)
        rows = {}
        for speaker in ("list", "bytes", "list", "bytes"):  # interleaved: drift hits both
            r = await _time(svc, args.requests, speaker)
            if speaker not in rows or r["total"] < rows[speaker]["total"]:
                rows[speaker] = r
        return rows

    rows = asyncio.run(run())
    date = dt.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"api-request-cpu-{date}.json"
    path.write_text(json.dumps(dict(date=date, requests=args.requests, cpu=os.cpu_count(), body=BODY,
                                    notes="ms per request, the pass with the lower total of two interleaved passes",
                                    rows=[dict(speaker=k, **v) for k, v in rows.items()]), indent=1))
    print(f"wrote {path}\n\n speaker   parse  prepare   start  vllm_front   total  (ms per request)")
    for k, r in rows.items():
        print(f" {k:7s} {r['parse']:7.3f} {r['prepare']:8.3f} {r['start']:7.3f} {r['vllm_front']:11.3f} {r['total']:7.3f}")


if __name__ == "__main__":
    main()
