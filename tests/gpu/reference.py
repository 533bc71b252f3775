"""Reference codes for the GPU parity test, made by the CPU PyTorch path (V1 engine, fp32).

`python -m tests.gpu.reference` writes tests/data/mrv2_reference.npz on a CPU machine; the GPU test
rebuilds the same random checkpoint from the same seed (torch's CPU generator is the same on both
machines) and checks that model runner V2 on the GPU produces the same codes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chattts_vllm.params import InferCodeParams

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "mrv2_reference.npz"
NUM_LAYERS = 20
TEXTS = ["你好，欢迎使用语音合成。", "Hello world, this is a test of speech synthesis.",
         "What is [uv_break]your favorite english food?[laugh]", "人工智能正在改变世界",
         "The quick brown fox jumps over the lazy dog.", "Mixed 中文 and English [lbreak] together"]
VOICES = ["alloy", None, "seed:7", None, "nova", "echo"]


def params() -> list[InferCodeParams]:
    return [InferCodeParams(temperature=1e-4, repetition_penalty=1.05, min_new_token=60,
                            max_new_token=90, manual_seed=500 + i) for i in range(len(TEXTS))]


def build_model(root: str | os.PathLike) -> Path:
    from chattts_vllm.checkpoint import convert, write_random_asset
    from tests.conftest import sharpen_heads

    root = Path(root)
    write_random_asset(root / "asset", num_layers=NUM_LAYERS, seed=0)
    sharpen_heads(root / "asset")
    return convert(root / "asset", root / "model")


def main() -> None:
    import tempfile

    from chattts_vllm.synthesize import ChatTTS

    with tempfile.TemporaryDirectory() as d:
        tts = ChatTTS(build_model(d), dtype="float32", max_model_len=512, enforce_eager=True)
        res = tts.infer_code(TEXTS, params(), voices=VOICES)
    np.savez_compressed(REFERENCE, **{f"codes_{i}": r.codes for i, r in enumerate(res)},
                        **{f"hidden_{i}": r.hidden[:8] for i, r in enumerate(res)})
    print("wrote", REFERENCE, [r.num_frames for r in res])


if __name__ == "__main__":
    main()
