"""benchmarks/bench_api_request.py runs the real parse / prepare / start path and writes its rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_api_request  # noqa: E402


def test_both_wire_forms_are_timed_and_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_api_request.py", "--requests", "5", "--out-dir", str(tmp_path)])
    bench_api_request.main()
    (path,) = tmp_path.glob("api-request-cpu-*.json")
    rows = {r["speaker"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"list", "bytes"}
    for r in rows.values():
        assert r["total"] == sum(r[k] for k in ("parse", "prepare", "start", "vllm_front")) > 0
    assert "vllm_front" in capsys.readouterr().out
