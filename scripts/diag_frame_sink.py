import torch, faulthandler, sys; faulthandler.enable()
import chattts_vllm.ops
W = torch.classes.chattts_vllm.FrameSinkWorker
w = W(4); print("made", flush=True)
z = torch.zeros(4, dtype=torch.int64)
for name, args in [("float records", (torch.zeros(4, 4).float(), z, z)), ("bad base", (torch.zeros(4, 4, dtype=torch.int32), torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)))]:
    try:
        w.push(*args); print(name, "no error", flush=True)
    except RuntimeError as e:
        print(name, "RuntimeError ok", str(e)[:60], flush=True)
print("wait", w.wait(1, 0.05), flush=True)
try:
    torch.ops.chattts_vllm.sample_codebooks(*([torch.zeros(1)] * 3))
except Exception as e:
    print("op error ok", type(e).__name__, flush=True)
del w; print("deleted", flush=True)
