"""Triton kernel: GFSQ codes → DVAE decoder input features (channels-last).

Twin: chattts_vllm/audio/gfsq.py (`GFSQ.forward_native`).

For frame row r and group g (R = 2 residual levels): z = Σ_q s_q · code(idx[r, g·R + q]) with
code(i)_j = (digit_j(i) − L//2) / (L//2), digit_j(i) = ⌊i / L^j⌋ mod L and s_q = (L − 1)^−q;
then out[r, g·D:(g+1)·D] = W_g z + b_g.
A K = 4 projection is four FMAs per output, so this is a bandwidth-bound broadcast, not a tl.dot.
Written as (B, T, G·D), the result already *is* the ×2 reshape (B, 2T, D) of the DVAE decoder.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gfsq_dequant_kernel(
    codes_ptr,    # (M, G·R) integer codes, row stride `code_stride_m`, column stride `code_stride_q`
    w_ptr,        # (G, D, DIM) project_out weights
    b_ptr,        # (G, D) project_out biases
    out_ptr,      # (M, G·D) features
    M, D, code_stride_m, code_stride_q,
    LEVEL: tl.constexpr, DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    pid_d = tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mmask = rm < M
    dmask = rd < D
    half: tl.constexpr = LEVEL // 2
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc += tl.load(b_ptr + g * D + rd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    # Two residual levels (ChatTTS: R = 2), digit by digit: z_j = Σ_q s_q · (digit_j − L//2) / (L//2).
    col = codes_ptr + rm * code_stride_m + (g * 2) * code_stride_q
    idx0 = tl.load(col, mask=mmask, other=0).to(tl.int32)
    idx1 = tl.load(col + code_stride_q, mask=mmask, other=0).to(tl.int32)
    for j in tl.static_range(DIM):
        z = ((idx0 % LEVEL).to(tl.float32) - half) / half
        z += ((idx1 % LEVEL).to(tl.float32) - half) / half * (1.0 / (LEVEL - 1))
        idx0 = idx0 // LEVEL
        idx1 = idx1 // LEVEL
        w = tl.load(w_ptr + (g * D + rd) * DIM + j, mask=dmask, other=0.0).to(tl.float32)
        acc += z[:, None] * w[None, :]
    tl.store(out_ptr + rm[:, None] * (tl.num_programs(1) * D) + g * D + rd[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def gfsq_dequantize(codes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                    levels: tuple[int, ...], residuals: int) -> torch.Tensor:
    """(B, T, G·R) codes (any strides, int32/int64) → (B, T, G·D) features in the weight dtype.

    weight: (G, D, len(levels)) stacked project_out weights; bias: (G, D). All levels must be equal.
    """
    if len(set(levels)) != 1 or residuals != 2:
        raise ValueError(f"the kernel assumes equal FSQ levels and 2 residual levels, got {levels}, "
                         f"{residuals}")
    bsz, t, ncode = codes.shape
    groups, d, dim = weight.shape
    assert ncode == groups * residuals and dim == len(levels)
    c2 = codes.reshape(bsz * t, ncode) if codes.stride(0) == t * codes.stride(1) else codes.reshape(-1, ncode)
    m = bsz * t
    out = torch.empty(bsz, t, groups * d, device=codes.device, dtype=weight.dtype)
    block_m, block_d = 16, min(128, triton.next_power_of_2(d))     # ~70 regs on sm_90a, no spills
    grid = (triton.cdiv(m, block_m), groups, triton.cdiv(d, block_d))
    _gfsq_dequant_kernel[grid](c2, weight.contiguous(), bias.contiguous(), out, m, d, c2.stride(0),
                               c2.stride(1), LEVEL=levels[0], DIM=dim,
                               BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return out
