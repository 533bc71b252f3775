"""`AsyncLLM` with its engine core in this process (serving/inproc.py), as Ray replicas run it on GPU.

The check runs in a subprocess of its own: an in-process engine core switches on vLLM's environment
cache, which would outlive it in the pytest process. It drives the speech service exactly as a
replica does and checks that no engine-core child process exists, that a text gives the same codes
(and audio up to float noise) alone and among 7 others, that a cancelled request is aborted in the engine, that utility calls
reach the core, and that shutdown stops the core's thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys, threading
    from types import SimpleNamespace

    import numpy as np
    import psutil

    CORE = "chattts-engine-core"
    IDS = __import__("itertools").count()


    async def main(model):
        from vllm.engine.arg_utils import AsyncEngineArgs

        from chattts_vllm import register
        from chattts_vllm.serving.inproc import build_inproc_async_engine
        from chattts_vllm.serving.protocol import parse_speech_request
        from chattts_vllm.serving.speech import STATE_KEY, SpeechPlugin

        register()
        args = AsyncEngineArgs(model=model, served_model_name=["chattts"], dtype="float32",
                               max_model_len=1024, enforce_eager=True, max_num_seqs=16)
        out = {}
        async with build_inproc_async_engine(args) as engine:
            out["client"] = type(engine.engine_core).__name__
            out["core_children"] = [p.name() for p in psutil.Process().children(recursive=True)
                                    if "EngineCore" in " ".join([p.name()] + p.cmdline())]
            out["core_thread"] = any(t.name == CORE for t in threading.enumerate())
            state = SimpleNamespace()
            await SpeechPlugin().init_state(engine, state, SimpleNamespace(
                model=model, served_model_name=["chattts"]))
            svc = getattr(state, STATE_KEY)

            async def speak(seed, frames=24):
                body = dict(model="chattts", input="Hello from the engine thread.", voice="alloy",
                            seed=seed, response_format="pcm", min_new_token=frames,
                            max_new_token=frames)
                req = parse_speech_request(json.dumps(body).encode(), ["chattts"])
                job = svc.start(await svc.prepare(req, f"t-{seed}-{frames}-{next(IDS)}"))
                try:
                    return await job.waveform(svc.audio), [list(u.token_ids) for u in job.utterances]
                finally:
                    job.close()

            alone = await speak(1)
            together = await asyncio.gather(*(speak(s) for s in range(1, 9)))
            # Codes are batch invariant; the hidden states (and so the audio) only to float noise.
            out["same_codes_alone_and_batched"] = alone[1] == together[0][1]
            out["audio_max_diff"] = float(np.abs(alone[0] - together[0][0]).max())
            out["samples"] = sorted({int(w.shape[0]) for w, _ in together})

            task = asyncio.create_task(speak(100, frames=600))
            for _ in range(600):
                await asyncio.sleep(0.05)
                if engine.output_processor.get_num_unfinished_requests():
                    break
            await asyncio.sleep(0.5)
            out["in_flight_before_cancel"] = engine.output_processor.get_num_unfinished_requests()
            task.cancel()
            for _ in range(200):
                await asyncio.sleep(0.05)
                if not engine.output_processor.get_num_unfinished_requests():
                    break
            out["in_flight_after_cancel"] = engine.output_processor.get_num_unfinished_requests()
            out["is_sleeping"] = await engine.is_sleeping()          # a utility call to the core
            out["samples_after"] = int((await speak(2))[0].shape[0])
            await engine.check_health()
        out["core_thread_after"] = any(t.name == CORE for t in threading.enumerate())
        print("RESULT " + json.dumps(out), flush=True)


    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1]))
''')


def test_inproc_engine_serves_speech(serving_model_dir, tmp_path):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "CHATTTS_VLLM_FRAME_DIR": str(tmp_path / "frames"), "CHATTTS_VLLM_AUDIO_THREADS": "2"}
    script = tmp_path / "inproc_check.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(serving_model_dir)], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["client"] == "InprocAsyncClient"
    assert out["core_children"] == [] and out["core_thread"]
    assert out["same_codes_alone_and_batched"] and out["audio_max_diff"] < 1e-4, out
    assert out["samples"] == [24 * 512 - 256] and out["samples_after"] == 24 * 512 - 256
    assert out["in_flight_before_cancel"] == 1 and out["in_flight_after_cancel"] == 0, out
    assert out["is_sleeping"] is False
    assert not out["core_thread_after"]
