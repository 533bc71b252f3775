"""Runs a kernel-cases script under the Triton interpreter in a child process.

TRITON_INTERPRET must be set before triton is imported, so each case script runs in its own
interpreter and prints its results as one JSON line (the last line: vLLM may log before it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_cases(script_name: str, timeout: float = 300) -> dict[str, float]:
    script = Path(__file__).with_name(script_name)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
