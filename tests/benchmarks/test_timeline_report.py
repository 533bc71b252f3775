"""benchmarks/timeline_report.py on a hand-written timeline: the join of the API's first-audio
stamps with the engine's admissions and steps, the stage split, bursts and a burst's step table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import timeline_report  # noqa: E402

from chattts_vllm.timeline import Timeline  # noqa: E402


def _write(folder: Path) -> None:
    """Two bursts of 3 requests (at t = 100 s and 200 s) and a lone one; the engine steps every
    10 ms from each burst on, admitting the burst's requests in its first two steps."""
    eng, api = Timeline(str(folder / "engine.1.jsonl")), Timeline(str(folder / "api.2.jsonl"))
    for base, n in ((100.0, 3), (200.0, 3), (300.0, 1)):
        for k in range(8):
            eng.event("step", t=base + 0.010 + 0.010 * k, rows=n, tokens=40 if k == 0 else n)
            eng.event("sampled", t=base + 0.012 + 0.010 * k)
        for i in range(n):
            sink = f"s{base:.0f}-{i}"
            add = base + 0.009 if i < 2 else base + 0.019        # the third joins the second step
            eng.event("add", t=add, sink=sink)
            api.event("first_audio", sink=sink, start=base + 0.001 * i, submitted=base + 0.005,
                      first_output=add + 0.015, frames=add + 0.065, audio=add + 0.085)
    api.event("first_audio", sink="never-admitted", start=1.0, submitted=1.0, first_output=None,
              frames=1.0, audio=1.0)
    eng.flush(), api.flush()


def test_requests_join_split_and_group_into_bursts(tmp_path):
    _write(tmp_path)
    reqs, steps, adds = timeline_report.load(tmp_path)
    assert len(reqs) == 7 and len(steps) == 24 and len(adds) == 7     # the unadmitted one is left out
    assert all(s["host_ms"] == pytest.approx(2.0) for s in steps)
    first = timeline_report.stage_ms(reqs[0])
    assert first == pytest.approx(dict(prepare=5.0, admit=4.0, first_output=15.0, frames=50.0,
                                       decode=20.0, ttfa=94.0))
    groups = timeline_report.bursts(reqs, gap_s=0.05)
    assert [len(g) for g in groups] == [3, 3, 1]
    table = timeline_report.burst_steps(groups[1], steps)
    assert [s["new"] for s in table[:3]] == [2, 1, 0]                  # arrivals by admitting step
    assert table[0]["at_ms"] == pytest.approx(10.0) and table[1]["since_prev_ms"] == pytest.approx(10.0)
    assert table[0]["tokens"] == 40 and table[-1]["at_ms"] <= 19 + 85


def test_the_script_prints_and_writes_the_median_burst(tmp_path, capsys, monkeypatch):
    _write(tmp_path)
    out = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["timeline_report.py", str(tmp_path), "--min-burst", "2",
                                      "--json", str(out)])
    timeline_report.main()
    printed = capsys.readouterr().out
    assert "7 requests, 24 engine steps; 2 bursts" in printed and "median burst: 3 requests" in printed
    report = json.loads(out.read_text())
    assert report["bursts"] == 2 and report["in_bursts"]["ttfa"]["p50"] > 90
    assert report["median_burst"]["admitted_ms"] == pytest.approx([9.0, 9.0, 19.0])
