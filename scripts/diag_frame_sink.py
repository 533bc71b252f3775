"""GPU probe (2026-11-28): on the H200 a C++ exception thrown out of FrameSinkWorker.push killed
the process. The worker now returns error codes; this checks that, then whether an exception out
of the sampler op (TORCH_CHECK in csrc/sample_codebooks.cu's host code) is survived too.

    PYTHONPATH=/root/site312:$PWD python3 scripts/diag_frame_sink.py
"""
import faulthandler

import torch

import chattts_vllm.ops  # noqa: F401  (loads chattts_vllm._C)

faulthandler.enable()
w = torch.classes.chattts_vllm.FrameSinkWorker(4)
z = torch.zeros(4, dtype=torch.int64)
print("bad records ->", w.push(torch.zeros(4, 4), z, z), flush=True)
print("bad base ->", w.push(torch.zeros(4, 4, dtype=torch.int32), z[:3], z[:3]), flush=True)
del w
try:
    torch.ops.chattts_vllm.sample_codebooks(*([torch.zeros(1)] * 3))
except Exception as e:  # the schema mismatch is raised by the dispatcher, in libtorch
    print("dispatcher error survived:", type(e).__name__, flush=True)
x = torch.zeros(2, 4, 626, device="cuda")
try:   # history of the wrong rank: the op's own TORCH_CHECK, thrown from our .so
    i = torch.zeros(2, dtype=torch.int64, device="cuda")
    f = torch.ones(2, device="cuda")
    torch.ops.chattts_vllm.sample_codebooks(x, torch.zeros(2, device="cuda"), None, None, None, 16,
                                            f, f, i, f, i.bool(), i, i, 625, None)
except RuntimeError as e:
    print("op TORCH_CHECK survived:", str(e)[:80], flush=True)
print("done", flush=True)
