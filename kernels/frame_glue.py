"""Triton kernels for the per-step glue of model runner V2 (chattts_vllm/runners/mrv2.py).

At batch 1 a decode step is host-bound: each small eager op costs ~8 µs of launch time. These two
kernels replace the ~40 gathers/wheres/scatters of the input embedding and of the frame commit with
one launch each. Twins: chattts_vllm/runners/frame_glue.py (`token_embeddings_torch`,
`commit_and_pack_torch`), which are also the fallback when `CHATTTS_VLLM_FUSED_GLUE=0`.

token_embeddings: per token t (slot s, position p, id i)
  audio (is_code[s] and p >= text_len[s]) -> ((e0 + e1) + e2) + e3, e_k = emb_code[k][codes[s, min(p, L), k]]
  text                                    -> emb_text[i]
  p == spk_pos[s]                         -> spk_vec[s] (fp32, rounded to the model dtype)
  Each partial sum is rounded to the model dtype, as PyTorch's eager adds do (bit-identical in bf16).

commit_and_pack: per sampled row r (slot s)
  eos = any code == EOS; commit = is_code[s] and num_sampled[r] > 0 and not eos
  commit -> codes[s, min(first + frame, L)] = the 4 codes (int32)
  record[r] = [frame + 1 if commit else 0, c0..c3, hidden[r] as fp32 bits]; sampled[r] = EOS or c0
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_embeddings_kernel(
    out_ptr, out_stride,                    # [n, H] model dtype
    ids_ptr, pos_ptr, slot_ptr,             # [n] int
    is_code_ptr, text_len_ptr, spk_pos_ptr,  # [S] bool / int64 / int64
    spk_vec_ptr, spk_stride,                # [S, H] fp32
    codes_ptr, codes_s_stride, codes_p_stride, codes_k_stride,   # [S, L + 1, 4] int32
    text_ptr, text_stride, num_text,        # [V, H] emb_text
    c0_ptr, c1_ptr, c2_ptr, c3_ptr, code_stride, num_codes,      # 4 x [626, H] emb_code
    H, trash,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    dtype = out_ptr.dtype.element_ty
    s = tl.load(slot_ptr + t).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    audio = (tl.load(is_code_ptr + s) != 0) & (p >= tl.load(text_len_ptr + s))
    if audio:
        row = codes_ptr + s * codes_s_stride + tl.minimum(p, trash) * codes_p_stride
        # Clamped like an index must be; the buffer only ever holds codes in [0, 626).
        k0 = tl.minimum(tl.maximum(tl.load(row).to(tl.int64), 0), num_codes - 1)
        k1 = tl.minimum(tl.maximum(tl.load(row + codes_k_stride).to(tl.int64), 0), num_codes - 1)
        k2 = tl.minimum(tl.maximum(tl.load(row + 2 * codes_k_stride).to(tl.int64), 0), num_codes - 1)
        k3 = tl.minimum(tl.maximum(tl.load(row + 3 * codes_k_stride).to(tl.int64), 0), num_codes - 1)
        e0 = tl.load(c0_ptr + k0 * code_stride + cols, mask=cmask, other=0.0)
        e1 = tl.load(c1_ptr + k1 * code_stride + cols, mask=cmask, other=0.0)
        e2 = tl.load(c2_ptr + k2 * code_stride + cols, mask=cmask, other=0.0)
        e3 = tl.load(c3_ptr + k3 * code_stride + cols, mask=cmask, other=0.0)
        tab = e0.dtype
        # PyTorch adds two tensors of the table dtype in fp32 and rounds: the same, step by step.
        acc = (e0.to(tl.float32) + e1.to(tl.float32)).to(tab)
        acc = (acc.to(tl.float32) + e2.to(tl.float32)).to(tab)
        acc = (acc.to(tl.float32) + e3.to(tl.float32)).to(tab)
        emb = acc.to(dtype)
    else:
        i = tl.minimum(tl.maximum(tl.load(ids_ptr + t).to(tl.int64), 0), num_text - 1)
        emb = tl.load(text_ptr + i * text_stride + cols, mask=cmask, other=0.0).to(dtype)
    if p == tl.load(spk_pos_ptr + s):
        emb = tl.load(spk_vec_ptr + s * spk_stride + cols, mask=cmask, other=0.0).to(dtype)
    tl.store(out_ptr + t.to(tl.int64) * out_stride + cols, emb, mask=cmask)


def token_embeddings(out: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                     is_code: torch.Tensor, text_len: torch.Tensor, spk_pos: torch.Tensor,
                     spk_vec: torch.Tensor, codes: torch.Tensor, trash: int,
                     emb_text: torch.Tensor, emb_code: list[torch.Tensor]) -> torch.Tensor:
    """Writes the ChatTTS input embedding of the n = len(ids) tokens into out[:n]; returns out[:n]."""
    n, H = len(ids), out.shape[1]
    if n == 0:
        return out[:0]
    assert len(emb_code) == 4 and all(w.stride() == emb_code[0].stride() for w in emb_code)
    assert out.stride(1) == emb_text.stride(1) == emb_code[0].stride(1) == spk_vec.stride(1) == 1
    block = min(triton.next_power_of_2(H), 1024)
    grid = (n, triton.cdiv(H, block))
    _token_embeddings_kernel[grid](
        out, out.stride(0), ids, pos, slot, is_code, text_len, spk_pos, spk_vec, spk_vec.stride(0),
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        emb_text, emb_text.stride(0), emb_text.shape[0],
        *emb_code, emb_code[0].stride(0), emb_code[0].shape[0], H, trash,
        BLOCK_H=block, num_warps=4 if block >= 512 else 2)
    return out[:n]


@triton.jit
def _commit_and_pack_kernel(
    sampled_ptr,                            # [B] int64 out: EOS or code0
    rec_ptr, rec_stride,                    # [B, 1 + 4 + H] int32 out
    new_ptr, new_stride,                    # [B, 4] sampled codes (int64)
    slot_ptr, first_ptr, frame_ptr, num_sampled_ptr,             # [B]
    is_code_ptr,                            # [S] bool
    codes_ptr, codes_s_stride, codes_p_stride, codes_k_stride,   # [S, L + 1, 4] int32, updated
    hid_ptr, hid_stride,                    # [B, H] bf16 / fp32
    H, trash,
    EOS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    rec = rec_ptr + r * rec_stride
    h = tl.load(hid_ptr + r * hid_stride + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(rec + 5 + cols, h.to(tl.int32, bitcast=True), mask=cmask)
    if tl.program_id(1) == 0:
        c0 = tl.load(new_ptr + r * new_stride)
        c1 = tl.load(new_ptr + r * new_stride + 1)
        c2 = tl.load(new_ptr + r * new_stride + 2)
        c3 = tl.load(new_ptr + r * new_stride + 3)
        eos = (c0 == EOS) | (c1 == EOS) | (c2 == EOS) | (c3 == EOS)
        s = tl.load(slot_ptr + r).to(tl.int64)
        frame = tl.load(frame_ptr + r).to(tl.int64)
        commit = (tl.load(is_code_ptr + s) != 0) & (tl.load(num_sampled_ptr + r) > 0) & (eos == 0)
        if commit:
            col = tl.minimum(tl.load(first_ptr + r).to(tl.int64) + frame, trash)
            dst = codes_ptr + s * codes_s_stride + col * codes_p_stride
            tl.store(dst, c0.to(tl.int32))
            tl.store(dst + codes_k_stride, c1.to(tl.int32))
            tl.store(dst + 2 * codes_k_stride, c2.to(tl.int32))
            tl.store(dst + 3 * codes_k_stride, c3.to(tl.int32))
        tl.store(rec, tl.where(commit, frame + 1, 0).to(tl.int32))
        tl.store(rec + 1, c0.to(tl.int32))
        tl.store(rec + 2, c1.to(tl.int32))
        tl.store(rec + 3, c2.to(tl.int32))
        tl.store(rec + 4, c3.to(tl.int32))
        tl.store(sampled_ptr + r, tl.where(eos, EOS, c0).to(tl.int64))


def commit_and_pack(codes_new: torch.Tensor, codes: torch.Tensor, is_code: torch.Tensor,
                    slot: torch.Tensor, first: torch.Tensor, frame: torch.Tensor,
                    num_sampled: torch.Tensor, hidden: torch.Tensor, trash: int, eos: int,
                    records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Commits the B sampled frames into `codes` and packs their side-channel records.

    Returns (sampled ids [B] int64, a fresh tensor as the async output needs; records[:B]).
    """
    B, H = codes_new.shape[0], hidden.shape[1]
    sampled = torch.empty(B, dtype=torch.int64, device=codes_new.device)
    if B == 0:
        return sampled, records[:0]
    assert records.dtype == torch.int32 and records.shape[1] == 5 + H and records.stride(1) == 1
    assert codes_new.stride(1) == 1 and hidden.stride(1) == 1
    block = min(triton.next_power_of_2(H), 1024)
    grid = (B, triton.cdiv(H, block))
    _commit_and_pack_kernel[grid](
        sampled, records, records.stride(0), codes_new, codes_new.stride(0),
        slot, first, frame, num_sampled, is_code,
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        hidden, hidden.stride(0), H, trash,
        EOS=eos, BLOCK_H=block, num_warps=4 if block >= 512 else 2)
    return sampled, records[:B]
