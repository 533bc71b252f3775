"""Quick GPU smoke of the model runner V2 path with timestamps (a debugging aid, not a test).

    CHATTTS_VLLM_DUMP_STACKS_AFTER=120 python3 tests/gpu/smoke_mrv2.py [--eager] [--layers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

T0 = time.time()


def log(msg: str) -> None:
    print(f"[smoke {time.time() - T0:7.1f}s] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eager", action="store_true")
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    from chattts_vllm.checkpoint import convert, write_random_asset
    from chattts_vllm.params import InferCodeParams
    from chattts_vllm.synthesize import ChatTTS

    with tempfile.TemporaryDirectory() as d:
        write_random_asset(f"{d}/asset", num_layers=args.layers, seed=0)
        model = convert(f"{d}/asset", f"{d}/model")
        log("checkpoint written")
        tts = ChatTTS(model, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                      enforce_eager=args.eager)
        log("engine up")
        info = tts.llm.llm_engine.collective_rpc(
            lambda self: (type(self.model_runner).__module__,
                          type(getattr(self.model_runner, "model_state", None)).__name__))
        log(f"runner {info}")
        res = tts.infer_code(["hello world", "你好"], InferCodeParams(manual_seed=1, min_new_token=30,
                                                                    max_new_token=40), use_tqdm=False)
        log(f"frames {[r.num_frames for r in res]} codes0 {res[0].codes[:3].tolist()}")


if __name__ == "__main__":
    main()
