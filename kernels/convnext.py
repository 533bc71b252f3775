"""Triton kernels for the ConvNeXt stacks of the Decoder, the DVAE and Vocos (channels-last).

Twin: chattts_vllm/audio/convnext.py (`ConvNeXtBlock.forward_native`, `conv1d_cl`).

A block x → x + s·W2·GELU(W1·LN(dwconv(x)) + b1) + b2 runs as
  1. `_dwconv_ln_kernel`   depthwise dilated conv + LayerNorm, one (time tile × all channels) per
                           program: the row statistics need every channel, the conv only neighbours
                           in time, so nothing is recomputed.
  2. the MLP, either
     split  `_conv_gemm_kernel` twice: W1 with bias+GELU in the epilogue, then W2 with
            bias, layer scale and residual in the epilogue (two big tensor-core GEMMs, the 4C
            intermediate makes one bf16 round trip through HBM), or
     fused  `_mlp_kernel`: both GEMMs in one program per row tile, the intermediate stays on chip
            (flash-MLP); needs a (rows × C) fp32 accumulator, so it only pays where registers allow.
The same `_conv_gemm_kernel` also runs every dense conv (conv_in k3, 1×1 conv_out, out_conv × coef,
Vocos embed k7, head) as an implicit GEMM over taps × input channels, with zero padding at each
sequence's edges, so no transposes or im2col buffers are materialized.

fp32 inputs use IEEE dots (no TF32) so the fp32 kernels match PyTorch to ~1e-6.
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
import triton.language as tl

from . import tune_cache

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MLP_MODE = os.environ.get("CHATTTS_CONVNEXT_MLP", "split")     # "split" | "fused"
AUTOTUNE = os.environ.get("CHATTTS_TRITON_AUTOTUNE", "1") != "0"
PERSISTENT_OK = os.environ.get("CHATTTS_TRITON_PERSISTENT", "1") != "0"   # 0: no persistent GEMM candidates


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))     # exact (erf) GELU, as nn.GELU()


# ----------------------------------------------------------------------------------------------
# 1. depthwise conv + LayerNorm
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dwconv_ln_kernel(
    x_ptr,        # (B, T, C) input, contiguous
    w_ptr,        # (C, KS) depthwise taps (unused when not CONV)
    b_ptr,        # (C,) conv bias
    lnw_ptr,      # (C,) LayerNorm weight
    lnb_ptr,      # (C,) LayerNorm bias
    y_ptr,        # (B, T, C) output
    T, C, eps,
    KS: tl.constexpr, DIL: tl.constexpr, CONV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    base = x_ptr + b * T * C
    if CONV:
        acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        for k in range(KS):                 # a runtime loop: unrolled taps would hoist KS tile loads
            ts = t + (k - KS // 2) * DIL
            m = (ts >= 0) & (ts < T)        # zero padding at the sequence edges
            xv = tl.load(base + ts[:, None] * C + c[None, :], mask=m[:, None] & cmask[None, :], other=0.0)
            wk = tl.load(w_ptr + c * KS + k, mask=cmask, other=0.0)
            acc += xv.to(tl.float32) * wk.to(tl.float32)[None, :]
    else:
        acc = tl.load(base + t[:, None] * C + c[None, :], mask=(t < T)[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / C
    diff = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    lnw = tl.load(lnw_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * lnw[None, :] + lnb[None, :]
    tl.store(y_ptr + b * T * C + t[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & cmask[None, :])


def dwconv_ln(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6,
              dilation: int = 1) -> torch.Tensor:
    """LN(dwconv(x)) on (B, T, C); weight (C, 1, KS), or None for a plain LayerNorm."""
    tune_cache.ensure_loaded()
    x = x.contiguous()
    bsz, t, c = x.shape
    y = torch.empty_like(x)
    block_c = triton.next_power_of_2(c)
    conv = weight is not None
    ks = weight.shape[-1] if conv else 1
    args = (x, weight.reshape(c, ks) if conv else ln_weight, bias if conv else ln_bias, ln_weight,
            ln_bias, y, t, c, eps)
    flags = dict(KS=ks, DIL=dilation, CONV=conv, BLOCK_C=block_c)
    if INTERPRET or not AUTOTUNE or block_c > 1024:
        block_t = 16
        warps = max(1, min(16, block_t * block_c // 1024))      # ~32 fp32 accumulators per thread
        _dwconv_ln_kernel[(triton.cdiv(t, block_t), bsz)](*args, **flags, BLOCK_T=block_t,
                                                          num_warps=warps)
    else:
        _dwconv_ln_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), bsz)](*args, **flags)
    return y


# Taller time tiles re-read less of the conv's halo (KS-1 dilated rows per tile: 75 % extra reads
# at 16 rows, dilation 2, KS 7); the row statistics do not depend on the tile, so every config gives
# the same bits. Keyed without T, so streaming's varying lengths reuse one tuning.
_dwconv_ln_tuned = triton.autotune(
    [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt, w in [(16, 8), (32, 8), (32, 16), (64, 16)]],
    key=["C", "KS", "DIL", "CONV", "BLOCK_C"])(_dwconv_ln_kernel)
tune_cache.register("convnext.dwconv_ln", _dwconv_ln_tuned)


# ----------------------------------------------------------------------------------------------
# 2. GEMMs with fused epilogues (bias, GELU, per-channel scale, residual)
#    _linear_tma_kernel  1×1 convs / linears on (B·T, K) rows: the MLP halves, conv_out, the head
#    _conv_tma_kernel    k-tap convs as an implicit GEMM: per tap, a TMA box of the (B, T, CIN)
#                        input shifted in time; TMA's zero fill outside [0, T) *is* the conv padding
#    _conv_gemm_kernel   pointer-based fallback for either (pre-Hopper GPUs, unaligned shapes)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile, in the order where GROUP_M row tiles share each weight tile in L2."""
    return _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile id `pid` in the grouped order."""
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % size_m, (pid % (GROUP_M * num_n)) // size_m


@triton.jit
def _spectrum(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns interleaved as (log-magnitude, phase) pairs → (re, im) pairs of the complex spectrum,
    magnitude capped at 100 (vocos ISTFTHead; twin: `ISTFTHead.spectrum`)."""
    logm, phase = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
    mag = tl.minimum(tl.exp(logm), 100.0)
    return tl.reshape(tl.join(mag * tl.cos(phase), mag * tl.sin(phase)), (BLOCK_M, BLOCK_N))


@triton.jit
def _epilogue(acc, rn, nmask, bias_ptr, scale_ptr, GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_SCALE: tl.constexpr, SPEC: tl.constexpr):
    """+ bias, GELU, × per-channel scale, or the ISTFT head's spectrum (a residual is added by the
    caller)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if SPEC:
        acc = _spectrum(acc, acc.shape[0], acc.shape[1])
    return acc


@triton.jit
def _linear_tile(a_desc, w_desc, om, on, K, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):         # TMA zero-fills the ragged edges
        acc = tl.dot(a_desc.load([om, k0]), w_desc.load([on, k0]).T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _linear_store(acc, r_desc, o_desc, om, on, N, bias_ptr, scale_ptr, GELU: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr,
                  SPEC: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = on + tl.arange(0, BLOCK_N)
    acc = _epilogue(acc, rn, rn < N, bias_ptr, scale_ptr, GELU, HAS_BIAS, HAS_SCALE, SPEC)
    if HAS_RES:
        acc += r_desc.load([om, on]).to(tl.float32)
    o_desc.store([om, on], acc.to(o_desc.dtype))


@triton.jit
def _linear_tma_kernel(
    a_desc,       # (M, K) activations, box [BLOCK_M, BLOCK_K]
    w_desc,       # (N, K) weight (nn.Linear layout), box [BLOCK_N, BLOCK_K]
    r_desc,       # (M, N) residual, box [BLOCK_M, BLOCK_N]      (if HAS_RES)
    o_desc,       # (M, N) output, box [BLOCK_M, BLOCK_N]
    bias_ptr, scale_ptr, M, N, K,
    GELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr,
    SPEC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, OCC: tl.constexpr,
):
    # PERSISTENT: a grid of OCC programs per SM, each looping over tiles. The flattened loop nest is
    # software-pipelined across tiles, so the next tile's TMA loads are in flight during this tile's
    # epilogue (GELU is ~30 FP32 instructions per element: not free at K = 512). OCC only sizes
    # the grid (host side). Otherwise one program per tile, as the classic Triton GEMM.
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        step = tl.num_programs(0)
        tile_c = tl.program_id(0) - step       # the epilogue's own counter (as tutorial 09)
        for tile in tl.range(tl.program_id(0), num_tiles, step, flatten=True):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _linear_tile(a_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, PRECISION,
                               BLOCK_M, BLOCK_N, BLOCK_K)
            tile_c += step
            pid_m, pid_n = _tile_coords(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _linear_store(acc, r_desc, o_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, bias_ptr,
                          scale_ptr, GELU, HAS_BIAS, HAS_SCALE, HAS_RES, SPEC, BLOCK_N)
    else:
        pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _linear_tile(a_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, PRECISION,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        _linear_store(acc, r_desc, o_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, bias_ptr, scale_ptr,
                      GELU, HAS_BIAS, HAS_SCALE, HAS_RES, SPEC, BLOCK_N)


@triton.jit
def _conv_tma_kernel(
    x_desc,       # (B, T, CIN) input, box [1, BLOCK_M, BLOCK_K]
    w_desc,       # (N, TAPS·CIN_PAD) tap-major weight, box [BLOCK_N, BLOCK_K]
    o_desc,       # (B, T, N) output, box [1, BLOCK_M, BLOCK_N]
    bias_ptr, scale_ptr, T, N, CIN, CIN_PAD,
    TAPS: tl.constexpr, DIL: tl.constexpr, GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, SPEC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tiles never straddle two sequences, so out-of-range time steps are exactly TMA's zero fill.
    # A K chunk past CIN reads the next tap's weights, but the matching activations are zeros.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_t = tl.cdiv(T, BLOCK_M)
    pid_n = pid % num_n
    pid_t = (pid // num_n) % num_t
    b = pid // (num_n * num_t)
    t0, on = pid_t * BLOCK_M, pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in tl.static_range(TAPS):
        for k0 in range(0, CIN, BLOCK_K):
            a = x_desc.load([b, t0 + (tap - TAPS // 2) * DIL, k0]).reshape(BLOCK_M, BLOCK_K)
            w = w_desc.load([on, tap * CIN_PAD + k0])
            acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
    rn = on + tl.arange(0, BLOCK_N)
    acc = _epilogue(acc, rn, rn < N, bias_ptr, scale_ptr, GELU, HAS_BIAS, HAS_SCALE, SPEC)
    o_desc.store([b, t0, on], acc.to(o_desc.dtype).reshape(1, BLOCK_M, BLOCK_N))


@triton.jit
def _conv_gemm_kernel(
    x_ptr,        # (M, CIN) activations, row = b·T + t
    w_ptr,        # (N, TAPS, CIN) weights, tap-major
    bias_ptr,     # (N,)      if HAS_BIAS
    scale_ptr,    # (N,)      if HAS_SCALE: per-output-channel multiplier (layer scale, coef)
    res_ptr,      # (M, N)    if HAS_RES: residual added last
    out_ptr,      # (M, N)
    M, N, CIN, T,
    TAPS: tl.constexpr, DIL: tl.constexpr, GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr, SPEC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    t = rm % T
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for tap in tl.static_range(TAPS):
        off = (tap - TAPS // 2) * DIL
        row_ok = (rm < M) & (t + off >= 0) & (t + off < T)      # zero padding at sequence edges
        a_row = x_ptr + (rm + off) * CIN
        w_col = w_ptr + rn.to(tl.int64) * (TAPS * CIN) + tap * CIN
        for k0 in range(0, CIN, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_row[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < CIN)[None, :], other=0.0)
            w = tl.load(w_col[None, :] + kk[:, None], mask=(kk < CIN)[:, None] & (rn < N)[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    nmask = rn < N
    acc = _epilogue(acc, rn, nmask, bias_ptr, scale_ptr, GELU, HAS_BIAS, HAS_SCALE, SPEC)
    omask = (rm < M)[:, None] & nmask[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _set_linear_boxes(nargs: dict) -> None:
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["r_desc"].block_shape = [bm, bn]
    nargs["o_desc"].block_shape = [bm, bn]


def _set_conv_boxes(nargs: dict) -> None:
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [1, bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["o_desc"].block_shape = [1, bm, bn]


def _configs(shapes, hook=None, group: bool = True) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, PERSISTENT, OCC]) tuples → configs."""
    out = []
    for bm, bn, bk, w, s, *pers in shapes:
        kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **({"GROUP_M": 8} if group else {})}
        if pers:
            kw.update(PERSISTENT=bool(pers[0]), OCC=pers[1])
        out.append(triton.Config(kw, num_warps=w, num_stages=s, pre_hook=hook))
    return out


def _tune_list(shapes: list) -> list:
    """Autotune candidates, first = the untuned default (CHATTTS_TRITON_AUTOTUNE=0 keeps only it:
    each candidate costs a ~1 s compile per distinct shape on a fresh machine)."""
    return shapes if AUTOTUNE else shapes[:1]


# Register use on sm_90a (ptxas, bf16, TMA): 128x128x64/w8 ≈ 120-175 regs, 64x256x64/w8 ≈ 115-136,
# 128x256x64/w8 ≈ 235-255 (48 B spill with the GELU epilogue), 64x128x64/w4 ≈ 115-136.
# Linear candidates add (PERSISTENT, OCC = programs per SM). Shared memory per program, bf16:
# stages·(BM + BN)·BK·2 + the epilogue's BM·BN·2 staging tile; OCC 2 needs ≤ ~113 KB each
# (128x128x64 s2: 96 KB; 64x128x64 s3: 88 KB), so one program's GELU epilogue overlaps the other's
# tensor-core main loop — the point at K = 512, where the main loop is only 8 steps.
# 128x128x128 s2 (persistent): 4 K steps of 128 at K = 512, 128 KB of stages + the 32 KB tile.
_LINEAR_SHAPES = _tune_list([c for c in [(128, 128, 64, 8, 4, 0, 1), (128, 256, 64, 8, 3, 0, 1),
                                          (128, 128, 64, 8, 4, 1, 1), (128, 128, 64, 8, 2, 1, 2),
                                          (128, 256, 64, 8, 3, 1, 1), (64, 256, 64, 8, 4, 0, 1),
                                          (64, 128, 64, 4, 3, 1, 2), (128, 128, 128, 8, 2, 1, 1)]
                                if PERSISTENT_OK or not c[5]])
_CONV_SHAPES = _tune_list([(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 4)])
_PTR_SHAPES = _tune_list([(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 2)])
_linear_tma_tuned = triton.autotune(_configs(_LINEAR_SHAPES, _set_linear_boxes),
                                    key=["N", "K", "GELU", "HAS_RES", "SPEC"])(_linear_tma_kernel)
_conv_tma_tuned = triton.autotune(_configs(_CONV_SHAPES, _set_conv_boxes, group=False),
                                  key=["N", "CIN", "TAPS", "SPEC"])(_conv_tma_kernel)
_conv_gemm_tuned = triton.autotune(_configs(_PTR_SHAPES),
                                   key=["N", "CIN", "TAPS", "HAS_RES", "SPEC"])(_conv_gemm_kernel)
tune_cache.register("convnext.linear_tma", _linear_tma_tuned)
tune_cache.register("convnext.conv_tma", _conv_tma_tuned)
tune_cache.register("convnext.conv_gemm", _conv_gemm_tuned)
# fp32 (IEEE dots run on CUDA cores, not tensor cores): small tiles, or the big ones spill badly.
_FP32_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2,
                "PERSISTENT": False, "OCC": 1}
# Interpreter: ragged tiles, and the persistent loop with few programs (several tiles each).
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "PERSISTENT": PERSISTENT_OK,
                     "OCC": 1}
_INTERPRET_SMS = 3


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


_W_CACHE: dict[tuple, tuple] = {}


def _cached(w: torch.Tensor, tag: str, make) -> torch.Tensor:
    """A re-laid-out copy of a weight, rebuilt only when the weight changes.

    Keyed by address, but an entry is valid only while it still points at the *same* live tensor
    (weakref) at the same version: a freed weight's address is soon reused by another tensor.
    """
    version = 0 if w.is_inference() else w._version          # inference tensors have no counter
    key = (tag, w.data_ptr(), tuple(w.shape), w.dtype, w.device)
    hit = _W_CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == version:
        return hit[2]
    if len(_W_CACHE) > 512:
        _W_CACHE.clear()
    out = make(w)
    _W_CACHE[key] = (weakref.ref(w), version, out)
    return out


def _tap_major(w: torch.Tensor, pad_to: int = 1) -> torch.Tensor:
    """(N, CIN, K) conv weight → (N, K, CIN_PAD) contiguous, CIN zero-padded to a multiple of pad_to."""
    def make(w):
        w3 = w.reshape(w.shape[0], w.shape[1], -1).permute(0, 2, 1)
        pad = -w3.shape[-1] % pad_to
        return torch.nn.functional.pad(w3, (0, pad)).contiguous() if pad else w3.contiguous()
    return _cached(w, f"tap{pad_to}", make)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"      # ignored for 16-bit inputs


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def tma_layout_ok(t: torch.Tensor) -> bool:
    """16-byte aligned base and strides, unit inner stride. A size-1 dim's stride is never used,
    and torch leaves it arbitrary (a 1x1 conv weight seen as (N, 1, CIN) keeps stride 1 there), so
    it does not count: counting it sent every 1x1 conv to the pointer fallback."""
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(
        (s * t.element_size()) % 16 == 0 for s, d in zip(t.stride()[:-1], t.shape[:-1]) if d > 1)


def _tma_device(device: torch.device) -> bool:
    """Whether TMA kernels run here: a Hopper+ GPU, or the interpreter."""
    return INTERPRET or _has_tma(device)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs `tma_layout_ok` tensors on a `_tma_device`."""
    return _tma_device(tensors[0].device) and all(tma_layout_ok(t) for t in tensors)


def _desc(t: torch.Tensor):
    from triton.tools.tensor_descriptor import TensorDescriptor

    # The box is a placeholder: `_set_*_boxes` writes the real one per launch config.
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1] * (t.dim() - 2) + [16, 16])


def _empty_rows(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (..., N) tensor whose row stride is padded to 16 bytes (TMA-describable)."""
    n = shape[-1]
    per = 16 // torch.empty(0, dtype=dtype).element_size()
    buf = torch.empty(*shape[:-1], n + (-n % per), dtype=dtype, device=device)
    return buf[..., :n]


def _launch(kernel, tuned, hook, grid_fn, args, flags, config: dict | None, dtype: torch.dtype):
    if config is None and INTERPRET:
        config = _INTERPRET_CONFIG
    if config is None and dtype == torch.float32:
        config = _FP32_CONFIG
    if config is None:
        tuned[lambda meta: (grid_fn(meta),)](*args, **flags)
        return
    cfg = {k: v for k, v in config.items() if k in kernel.arg_names}
    for k, v in (("PERSISTENT", False), ("OCC", 1)):
        if k in kernel.arg_names:
            cfg.setdefault(k, v)
    if hook is not None:
        hook({**dict(zip(kernel.arg_names, args)), **cfg})
    kernel[(grid_fn(cfg),)](*args, **flags, **cfg, num_warps=config.get("num_warps", 4),
                            num_stages=config.get("num_stages", 3))


def _interleave_rows(w: torch.Tensor) -> torch.Tensor:
    """(2n, ...) → rows ordered 0, n, 1, n+1, …: the head's (log-magnitude, phase) pairs side by side."""
    def make(w):
        n = w.shape[0] // 2
        return torch.stack([w[:n], w[n:]], dim=1).reshape(w.shape).contiguous()
    return _cached(w, "interleave", make)


def conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              dilation: int = 1, gelu: bool = False, scale: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
              spectrum: bool = False, config: dict | None = None,
              tma: bool | None = None) -> torch.Tensor:
    """Channels-last conv1d ('same' zero padding, odd kernel) or linear on (B, T, CIN) → (B, T, N).

    weight: (N, CIN, K) conv or (N, CIN) linear. Epilogue order: + bias, GELU, × scale, + residual.
    The output's row stride is padded to 16 bytes (a view), so any N stays TMA-describable
    downstream (mel: 100 channels, the head: 1026).
    spectrum: the Vocos ISTFT head — outputs are (log-magnitude, phase) halves, N = 2·F; returns
    the complex spectrum (B, T, F) (complex64; needs out_dtype float32), computed in the epilogue.
    """
    tune_cache.ensure_loaded()
    if spectrum:
        assert out_dtype == torch.float32 and not (gelu or scale is not None or residual is not None)
        weight = _interleave_rows(weight)
        bias = _interleave_rows(bias) if bias is not None else None
    if x.stride(-1) != 1:
        x = x.contiguous()
    if tma is None and _tma_device(x.device) and not tma_layout_ok(x):
        # Rows that are not 16-byte aligned (100 mel channels in bf16 are 200 bytes: a streaming
        # window cast from float32) would send this call to the pointer kernel, whose bf16 results
        # differ in the last bits from the TMA kernel's. The same frames then decoded differently
        # streamed and whole (the H100 server test saw twice the difference). One copy into padded
        # rows keeps every call of a shape on the same kernel.
        x = _empty_rows(tuple(x.shape), x.dtype, x.device).copy_(x)
    bsz, t, cin = x.shape
    n, taps = weight.shape[0], (1 if weight.dim() == 2 else weight.shape[-1])
    dtype = out_dtype or x.dtype
    out = _empty_rows((bsz, t, n), dtype, x.device)
    flags = dict(GELU=gelu, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, SPEC=spectrum,
                 PRECISION=_precision(x.dtype))
    bias_arg = bias if bias is not None else weight
    scale_arg = scale if scale is not None else weight
    per = 16 // x.element_size()
    w_tma = _tap_major(weight, per)                                   # (N, TAPS, CIN_PAD)
    if tma is None:
        tma = _tma_ok(x, out, w_tma, *([residual] if residual is not None else []))
    if residual is not None and (not tma or taps != 1):
        tma = False
    rows_merge = x.stride(0) == t * x.stride(1) and out.stride(0) == t * out.stride(1)
    if tma and taps == 1 and rows_merge:
        m = bsz * t
        x2, o2 = x.view(m, cin), out.view(m, n)     # views keep the padded row strides
        r2 = residual.reshape(m, n) if residual is not None else o2
        w2 = w_tma.view(n, -1)
        args = (_desc(x2), _desc(w2), _desc(r2), _desc(o2), bias_arg, scale_arg, m, n, cin)
        sms = _num_sms(x.device)

        def grid(c):
            tiles = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])
            return min(tiles, sms * c["OCC"]) if c["PERSISTENT"] else tiles
        _launch(_linear_tma_kernel, _linear_tma_tuned, _set_linear_boxes, grid, args,
                dict(flags, HAS_RES=residual is not None), config, x.dtype)
    elif tma:
        w2 = w_tma.view(n, -1)
        args = (_desc(x), _desc(w2), _desc(out), bias_arg, scale_arg, t, n, cin, w_tma.shape[-1])
        grid = lambda c: bsz * triton.cdiv(t, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])  # noqa: E731
        _launch(_conv_tma_kernel, _conv_tma_tuned, _set_conv_boxes, grid, args,
                dict(flags, TAPS=taps, DIL=dilation), config, x.dtype)
    else:
        x = x.contiguous()
        out = torch.empty(bsz, t, n, device=x.device, dtype=dtype)
        res = residual.contiguous() if residual is not None else out
        args = (x, _tap_major(weight), bias_arg, scale_arg, res, out, bsz * t, n, cin, t)
        grid = lambda c: triton.cdiv(bsz * t, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])  # noqa: E731
        _launch(_conv_gemm_kernel, _conv_gemm_tuned, None, grid, args,
                dict(flags, TAPS=taps, DIL=dilation, HAS_RES=residual is not None), config, x.dtype)
    if spectrum:                                    # (re, im) pairs: a free view as complex64
        return torch.view_as_complex(out.unflatten(-1, (n // 2, 2)))
    return out


# ----------------------------------------------------------------------------------------------
# 2'. fused MLP (flash-MLP): the 4C intermediate never leaves the chip
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mlp_tma_kernel(
    y_desc,       # (M, C) LayerNorm output, block [BLOCK_M, BLOCK_K]
    w1_desc,      # (I, C) pwconv1 weight, block [BLOCK_I, BLOCK_K]
    w2_desc,      # (C, I) pwconv2 weight, block [HALF_C, BLOCK_I]
    x_desc,       # (M, C) residual, block [BLOCK_M, HALF_C]
    o_desc,       # (M, C) output, block [BLOCK_M, HALF_C]
    b1_ptr, b2_ptr, s_ptr, M, C, I,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HALF_C: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The (BLOCK_M × C) fp32 accumulator is two halves: a TMA box is at most 256 wide.
    om = tl.program_id(0) * BLOCK_M
    acc0 = tl.zeros((BLOCK_M, HALF_C), tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF_C), tl.float32)
    for i0 in range(0, I, BLOCK_I):
        h = tl.zeros((BLOCK_M, BLOCK_I), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            h = tl.dot(y_desc.load([om, k0]), w1_desc.load([i0, k0]).T, h, input_precision=PRECISION)
        ii = i0 + tl.arange(0, BLOCK_I)
        h += tl.load(b1_ptr + ii, mask=ii < I, other=0.0).to(tl.float32)[None, :]
        h = _gelu(h).to(y_desc.dtype)
        acc0 = tl.dot(h, w2_desc.load([0, i0]).T, acc0, input_precision=PRECISION)
        acc1 = tl.dot(h, w2_desc.load([HALF_C, i0]).T, acc1, input_precision=PRECISION)
    for half in tl.static_range(2):
        acc = acc0 if half == 0 else acc1
        rc = half * HALF_C + tl.arange(0, HALF_C)
        acc = _epilogue(acc, rc, rc < C, b2_ptr, s_ptr, False, True, True, False)
        acc += x_desc.load([om, half * HALF_C]).to(tl.float32)
        o_desc.store([om, half * HALF_C], acc.to(o_desc.dtype))


@triton.jit
def _mlp_kernel(
    y_ptr,        # (M, C) LayerNorm output
    w1_ptr,       # (I, C) pwconv1 weight
    b1_ptr,       # (I,)
    w2_ptr,       # (C, I) pwconv2 weight
    b2_ptr,       # (C,)
    s_ptr,        # (C,) layer scale
    x_ptr,        # (M, C) residual
    out_ptr,      # (M, C)
    M, C, I,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_K)
    ri = tl.arange(0, BLOCK_I)
    mmask = rm < M
    cmask = rc < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for i0 in range(0, I, BLOCK_I):
        ii = i0 + ri
        imask = ii < I
        h = tl.zeros((BLOCK_M, BLOCK_I), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + rk
            a = tl.load(y_ptr + rm[:, None] * C + kk[None, :], mask=mmask[:, None] & (kk < C)[None, :],
                        other=0.0)
            w1 = tl.load(w1_ptr + ii[None, :].to(tl.int64) * C + kk[:, None],
                         mask=(kk < C)[:, None] & imask[None, :], other=0.0)
            h = tl.dot(a, w1, h, input_precision=PRECISION)
        h += tl.load(b1_ptr + ii, mask=imask, other=0.0).to(tl.float32)[None, :]
        h = _gelu(h).to(w2_ptr.dtype.element_ty)
        w2 = tl.load(w2_ptr + rc[None, :].to(tl.int64) * I + ii[:, None],
                     mask=imask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(h, w2, acc, input_precision=PRECISION)
    acc = _epilogue(acc, rc, cmask, b2_ptr, s_ptr, False, True, True, False)
    omask = mmask[:, None] & cmask[None, :]
    offs = rm[:, None] * C + rc[None, :]
    acc += tl.load(x_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _set_mlp_blocks(nargs: dict) -> None:
    bm, bi, bk, hc = nargs["BLOCK_M"], nargs["BLOCK_I"], nargs["BLOCK_K"], nargs["HALF_C"]
    nargs["y_desc"].block_shape = [bm, bk]
    nargs["w1_desc"].block_shape = [bi, bk]
    nargs["w2_desc"].block_shape = [hc, bi]
    nargs["x_desc"].block_shape = [bm, hc]
    nargs["o_desc"].block_shape = [bm, hc]


def _mlp_configs(hook=None) -> list[triton.Config]:
    # sm_90a, bf16, C = 512: BLOCK_M 64 / 8 warps ≈ 250 regs without spills; BLOCK_M 128 spills.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_I": bi, "BLOCK_K": bk}, num_warps=w, num_stages=s,
                          pre_hook=hook)
            for bm, bi, bk, w, s in _tune_list([(64, 64, 64, 8, 3), (64, 128, 64, 8, 2),
                                                (64, 32, 64, 8, 3)])]


_mlp_tma_tuned = triton.autotune(_mlp_configs(_set_mlp_blocks), key=["C", "I"])(_mlp_tma_kernel)
_mlp_tuned = triton.autotune(_mlp_configs(), key=["C", "I"])(_mlp_kernel)
tune_cache.register("convnext.mlp_tma", _mlp_tma_tuned)
tune_cache.register("convnext.mlp", _mlp_tuned)


def fused_mlp(y: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
              config: dict | None = None, tma: bool | None = None) -> torch.Tensor:
    """x + scale · (W2·GELU(W1·y + b1) + b2) on (B, T, C), one kernel."""
    tune_cache.ensure_loaded()
    bsz, t, c = x.shape
    i = w1.shape[0]
    m = bsz * t
    y2, x2 = y.contiguous().view(m, c), x.contiguous().view(m, c)
    w1, w2 = w1.contiguous(), w2.contiguous()
    out = torch.empty_like(x2)
    half = c // 2
    if tma is None:
        tma = (c % 2 == 0 and half == triton.next_power_of_2(half) and 16 <= half <= 256
               and _tma_ok(y2, x2, out, w1, w2))
    if config is None and INTERPRET:
        config = {"BLOCK_M": 16, "BLOCK_I": 32, "BLOCK_K": 16}
    if config is None and x.dtype == torch.float32:
        config = {"BLOCK_M": 32, "BLOCK_I": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    prec = _precision(x.dtype)
    if tma:
        args = (_desc(y2), _desc(w1), _desc(w2), _desc(x2), _desc(out), b1, b2, scale, m, c, i)
        if config is not None:
            cfg = dict(config)
            warps, stages = cfg.pop("num_warps", 8), cfg.pop("num_stages", 2)
            _set_mlp_blocks({**dict(zip(_mlp_tma_kernel.arg_names, args)), **cfg, "HALF_C": half})
            _mlp_tma_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](*args, PRECISION=prec, HALF_C=half,
                                                              **cfg, num_warps=warps, num_stages=stages)
        else:
            _mlp_tma_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](*args, PRECISION=prec,
                                                                            HALF_C=half)
    else:
        args = (y2, w1, b1, w2, b2, scale, x2, out, m, c, i)
        block_c = max(16, triton.next_power_of_2(c))
        if config is not None:
            cfg = dict(config)
            warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
            _mlp_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](*args, PRECISION=prec, BLOCK_C=block_c,
                                                          **cfg, num_warps=warps, num_stages=stages)
        else:
            _mlp_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](*args, PRECISION=prec,
                                                                        BLOCK_C=block_c)
    return out.view(bsz, t, c)


# ----------------------------------------------------------------------------------------------
# the block
# ----------------------------------------------------------------------------------------------

def convnext_block(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                   ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor,
                   b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, scale: torch.Tensor, *,
                   dilation: int = 1, eps: float = 1e-6, mlp: str | None = None) -> torch.Tensor:
    """One ConvNeXt block on (B, T, C); `mlp` = "split" (default) or "fused" (see module doc)."""
    y = dwconv_ln(x, dw_weight, dw_bias, ln_weight, ln_bias, eps, dilation)
    if (mlp or MLP_MODE) == "fused":
        return fused_mlp(y, w1, b1, w2, b2, scale, x)
    h = conv_gemm(y, w1, b1, gelu=True)
    return conv_gemm(h, w2, b2, scale=scale, residual=x)
