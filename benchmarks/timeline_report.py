"""Where streamed requests' time to first audio goes, from a server's timeline (chattts_vllm/timeline.py).

    CHATTTS_VLLM_TIMELINE=/tmp/tl chattts-vllm serve MODEL ...     # then load it, e.g. bench_serving
    python benchmarks/timeline_report.py /tmp/tl [--json out.json]

Joins every API process's `first_audio` events with the engine's `add` events (by frame-file key)
and its steps, and splits each request's time to first audio into:

- prepare: HTTP start -> submitted to the engine client (text to prompts, in the API process);
- admit: submitted -> admitted by the model runner (input processing, the hop to the engine core,
  waiting for the step that schedules it);
- first output: admitted -> the API process holds its first token (the prefill step, output
  processing and the hop back);
- frames: first token -> the first chunk's frames are there (decode steps);
- decode: frames -> first audio (Decoder + Vocos).

Requests are grouped into arrival bursts (starts less than `--gap` apart). For the burst with the
median time to first audio, it prints the engine's steps from the burst's first start to its last
first audio: when each ran, its rows, tokens and arrivals, and its host time (inputs to sampler).
"""
from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path

import numpy as np

STAGES = (("prepare", "start", "submitted"), ("admit", "submitted", "add"),
          ("first_output", "add", "first_output"), ("frames", "first_output", "frames"),
          ("decode", "frames", "audio"))


def load(folder: Path) -> tuple[list[dict], list[dict], dict[str, float]]:
    """(requests: first_audio events with their engine admission `add`, engine steps, ...)."""
    events: list[dict] = []
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    adds = {e["sink"]: e["t"] for e in events if e["kind"] == "add"}
    steps = sorted((e for e in events if e["kind"] == "step"), key=lambda e: e["t"])
    sampled = sorted(e["t"] for e in events if e["kind"] == "sampled")
    for s in steps:                 # the step's host time: its inputs to the end of its sampler
        i = bisect.bisect_left(sampled, s["t"])
        s["host_ms"] = (sampled[i] - s["t"]) * 1e3 if i < len(sampled) else None
    reqs = []
    for e in events:
        if e["kind"] == "first_audio" and e["sink"] in adds:
            reqs.append({**e, "add": adds[e["sink"]]})
    reqs.sort(key=lambda r: r["start"])
    return reqs, steps, adds


def stage_ms(r: dict) -> dict[str, float | None]:
    out = {}
    for name, a, b in STAGES:
        out[name] = (r[b] - r[a]) * 1e3 if r.get(a) is not None and r.get(b) is not None else None
    out["ttfa"] = (r["audio"] - r["start"]) * 1e3
    return out


def bursts(reqs: list[dict], gap_s: float) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for r in reqs:
        if groups and r["start"] - groups[-1][-1]["start"] <= gap_s:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for name in [s for s, _, _ in STAGES] + ["ttfa"]:
        v = np.array([x[name] for x in rows if x[name] is not None])
        if v.size:
            out[name] = {"p50": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                         "mean": float(v.mean())}
    return out


def burst_steps(group: list[dict], steps: list[dict]) -> list[dict]:
    """The engine's steps from the burst's first start to its last first audio, with arrivals."""
    t0, t1 = group[0]["start"], max(r["audio"] for r in group)
    adds = sorted(r["add"] for r in group)
    times = [s["t"] for s in steps]
    lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
    out = []
    for i in range(lo, hi):
        s = steps[i]
        prev = steps[i - 1]["t"] if i > 0 else None
        # Arrivals admitted for this step: `add` runs in the step's input preparation, before it.
        since = prev if prev is not None else t0
        new = bisect.bisect_right(adds, s["t"]) - bisect.bisect_right(adds, since)
        out.append(dict(at_ms=(s["t"] - t0) * 1e3, rows=s["rows"], tokens=s["tokens"], new=new,
                        host_ms=s.get("host_ms"),
                        since_prev_ms=(s["t"] - prev) * 1e3 if prev is not None else None))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--gap", type=float, default=0.05, help="seconds between starts that end a burst")
    p.add_argument("--min-burst", type=int, default=8, help="requests a burst needs to be shown")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    reqs, steps, _ = load(args.folder)
    if not reqs:
        raise SystemExit(f"no joined first-audio events under {args.folder}")
    rows = [stage_ms(r) for r in reqs]
    groups = [g for g in bursts(reqs, args.gap) if len(g) >= args.min_burst]
    burst_rows = [stage_ms(r) for g in groups for r in g]
    report = {"requests": len(reqs), "steps": len(steps), "all": summary(rows),
              "bursts": len(groups), "in_bursts": summary(burst_rows) if burst_rows else {}}
    print(f"{len(reqs)} requests, {len(steps)} engine steps; {len(groups)} bursts of >= {args.min_burst}")
    for label, summ in (("all requests", report["all"]), ("in bursts", report["in_bursts"])):
        if summ:
            print(f"  {label:13s} " + "  ".join(f"{k} {v['p50']:.1f}/{v['p95']:.1f}" for k, v in summ.items())
                  + "   (ms, p50/p95)")
    if groups:
        ttfa = [float(np.median([stage_ms(r)["ttfa"] for r in g])) for g in groups]
        g = groups[int(np.argsort(ttfa)[len(ttfa) // 2])]
        table = burst_steps(g, steps)
        adds = [(r["add"] - g[0]["start"]) * 1e3 for r in g]
        subs = [(r["submitted"] - g[0]["start"]) * 1e3 for r in g]
        print(f"median burst: {len(g)} requests, ttfa p50 {np.median([stage_ms(r)['ttfa'] for r in g]):.0f} ms; "
              f"submitted {min(subs):.0f}-{max(subs):.0f} ms, admitted {min(adds):.0f}-{max(adds):.0f} ms "
              f"after its first start; {len(table)} steps until its last first audio")
        print("   at ms  rows  tokens  new  host ms  since prev")
        for s in table:
            host = f"{s['host_ms']:7.1f}" if s["host_ms"] is not None else "      -"
            prev = f"{s['since_prev_ms']:9.1f}" if s["since_prev_ms"] is not None else "        -"
            print(f"  {s['at_ms']:6.1f}  {s['rows']:4d}  {s['tokens']:6d}  {s['new']:3d}  {host}  {prev}")
        report["median_burst"] = {"requests": len(g), "steps": table, "admitted_ms": sorted(adds),
                                  "submitted_ms": sorted(subs)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
