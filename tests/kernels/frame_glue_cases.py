"""The MRv2 glue kernels (kernels/frame_glue.py) vs their PyTorch twins (runners/frame_glue.py).

Shared by test_frame_glue_interpret.py (CPU, TRITON_INTERPRET=1 in a child process, small shapes,
fp32) and test_frame_glue_gpu.py (CUDA, real shapes, bf16 and fp32). Each case returns the relative
float error (max|kernel − twin| / max|twin|) and the number of mismatching integer outputs; both
paths run on the same device and dtype, so the float error is the kernel's own rounding.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from chattts_vllm.audio.convnext import triton_kernels
from chattts_vllm.gpt.model import ChatTTSForCausalLM
from chattts_vllm.runners.frame_glue import commit_and_pack_torch, token_embeddings_torch

EOS, NUM_CODES, NUM_VQ = 625, 626, 4


class _Embedder(nn.Module):
    """The model's real `embed_tokens` on bare tables (no vLLM config needed)."""

    embed_tokens = ChatTTSForCausalLM.embed_tokens

    def __init__(self, emb_text: torch.Tensor, emb_code: list[torch.Tensor]):
        super().__init__()
        self.model = SimpleNamespace(embed_input_ids=lambda ids: F.embedding(ids.long(), emb_text))
        self.emb_code = nn.ModuleList(nn.Embedding.from_pretrained(w) for w in emb_code)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _state(S: int, L: int, H: int, g: torch.Generator, device, text_len: int):
    """Per-slot state as ChatTTSModelState keeps it; slot 3 (mod 6) is a plain-text request."""
    is_code = torch.ones(S, dtype=torch.bool)
    is_code[3::6] = False
    tl = text_len - torch.arange(S) % 3                     # text_len, -1, -2, text_len, ...
    spk_pos = torch.full((S,), 2)
    spk_pos[1::4] = -1                                      # no speaker
    spk_vec = torch.randn(S, H, generator=g)
    codes = torch.randint(0, NUM_CODES, (S, L + 1, NUM_VQ), generator=g, dtype=torch.int32)
    return [t.to(device) for t in (is_code, tl, spk_pos, spk_vec, codes)]


def embed_case(S: int, L: int, H: int, V: int, slots: list[int], pos: list[int], device, dtype,
               seed: int = 0, text_len: int = 8) -> dict[str, float]:
    """Fills `out` with the kernel and compares with the twin; slots/pos: one entry per token."""
    g = torch.Generator().manual_seed(seed)
    is_code, tlen, spk_pos, spk_vec, codes = _state(S, L, H, g, device, text_len)
    emb_text = torch.randn(V, H, generator=g).to(device, dtype)
    emb_code = [torch.randn(NUM_CODES, H, generator=g).to(device, dtype) for _ in range(NUM_VQ)]
    n = len(slots)
    slot = torch.tensor(slots, dtype=torch.int32, device=device)      # idx_mapping is int32
    pos_t = torch.tensor(pos, dtype=torch.int64, device=device)
    ids = torch.randint(0, V, (n,), generator=g, dtype=torch.int32).to(device)
    state = (is_code, tlen, spk_pos, spk_vec, codes, L)
    want = token_embeddings_torch(_Embedder(emb_text, emb_code).embed_tokens, ids, pos_t,
                                  slot.long(), *state)
    out = torch.full((n + 5, H), 7.0, dtype=dtype, device=device)       # rows past n stay put
    got = triton_kernels("frame_glue").token_embeddings(out, ids, pos_t, slot, *state, emb_text,
                                                        emb_code)
    audio = (is_code[slot.long()] & (pos_t >= tlen[slot.long()])).sum().item()
    spk = (pos_t == spk_pos[slot.long()]).sum().item()
    assert 0 < audio < n and spk > 0, "a case must mix text, audio and speaker tokens"
    return {"err": rel(got, want), "bad": float((out[n:] != 7.0).sum().item()),
            "dtype_ok": float(got.dtype == dtype and got.data_ptr() == out.data_ptr())}


def commit_case(S: int, L: int, H: int, B: int, device, dtype, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    is_code, _, _, _, codes = _state(S, L, H, g, device, 8)
    slot = torch.randperm(S, generator=g)[:B].to(device)              # distinct slots per step
    first = torch.randint(0, L // 2, (B,), generator=g).to(device)
    frame = torch.randint(0, L // 2, (B,), generator=g)
    frame[0] = L                                                     # first + frame past the trash column
    frame = frame.to(device)
    new = torch.randint(0, NUM_CODES - 1, (B, NUM_VQ), generator=g)
    new[1::5, 2] = EOS                                               # EOS in any codebook
    new[2::7, 0] = EOS
    new = new.to(device)
    num_sampled = torch.ones(B, dtype=torch.int32)
    num_sampled[3::4] = 0                                            # chunked-prefill rows
    num_sampled = num_sampled.to(device)
    is_code[slot[4]] = False
    hidden = torch.randn(B + 3, H, generator=g).to(device, dtype)[:B]
    args = (is_code, slot, first, frame, num_sampled, hidden, L, EOS)
    ref_codes, got_codes = codes.clone(), codes.clone()
    want_ids, want_rec = commit_and_pack_torch(new, ref_codes, *args)
    records = torch.full((S, 5 + H), -9, dtype=torch.int32, device=device)
    got_ids, got_rec = triton_kernels("frame_glue").commit_and_pack(new, got_codes, *args,
                                                                    records=records)
    commits = (want_rec[:, 0] > 0).sum().item()
    assert 0 < commits < B, "a case must mix committed and uncommitted rows"
    # The twin parks uncommitted rows in the trash column, the kernel skips them: compare [:L].
    return {"ids_bad": float((got_ids != want_ids).sum().item()),
            "ids_dtype_ok": float(got_ids.dtype == torch.int64),
            "rec_bad": float((got_rec != want_rec).sum().item()),
            "codes_bad": float((got_codes[:, :L] != ref_codes[:, :L]).sum().item()),
            "untouched_bad": float((records[B:] != -9).sum().item()),
            "hidden_err": rel(got_rec[:, 5:].view(torch.float32), hidden.float())}


def interpreter_cases() -> dict[str, float]:
    cpu, f32 = torch.device("cpu"), torch.float32
    res: dict[str, float] = {}
    # text_len per slot 0..5: 8 7 6 8 7 6; speaker at 2 (not slots 1, 5); slot 3 is plain text.
    # 10 tokens: a prefill of slot 0 across its speaker position and into audio, slot 2 exactly at
    # its text_len, slot 5 just before it, the text slot 3, slot 4 past the trash clamp (L = 16).
    L = 16
    cases = {
        "mixed": ([0, 0, 0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 9, 12, 6, 11, 19, 5]),
        "decode": ([5, 2, 0, 4, 1, 3], [13, 9, 2, 30, 7, 14]),
    }
    for name, (slots, pos) in cases.items():
        for h in (32, 48):
            for k, v in embed_case(6, L, h, 50, slots, pos, cpu, f32, seed=h).items():
                res[f"embed_{name}_h{h}_{k}"] = v
    for h in (32, 40):
        for k, v in commit_case(6, L, h, 6, cpu, f32, seed=h).items():
            res[f"commit_h{h}_{k}"] = v
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    with torch.no_grad():
        print("\n" + json.dumps(interpreter_cases()))      # the last line (vLLM logs to stdout)
