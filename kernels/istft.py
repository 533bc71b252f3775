"""Triton kernel: the inverse STFT's windowed overlap-add and window-envelope normalisation.

Twin: chattts_vllm/audio/vocoder.py (`istft_window`: frames · window → overlap-add → ÷ envelope).

The inverse FFT of each frame stays cuFFT (`torch.fft.irfft`); this kernel replaces everything
after it — the window multiply, the R = n_fft/hop shifted adds, the envelope Σ window², the slice to
the complete samples and the division — with one read of the frames and one write of the samples.
Output sample u (in overlap-add coordinates) lies in hop segment q = u // hop; frames j = q − k,
k < R, cover it at offset k·hop + u mod hop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _istft_ola_kernel(
    fr_ptr,       # (B, J, n_fft) inverse-FFT frames (not yet windowed), last dim contiguous
    win_ptr,      # (n_fft,) synthesis window, fp32
    out_ptr,      # (B, L) samples [start, start + L) of the overlap-add
    J, L, start, stride_fb, stride_fj, stride_ob,
    HOP: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    smask = s < L
    u = s + start
    q = u // HOP
    r = u % HOP
    acc = tl.zeros((BLOCK,), tl.float32)
    env = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(R):
        j = q - k
        ok = smask & (j >= 0) & (j < J)
        w = tl.load(win_ptr + k * HOP + r, mask=smask, other=0.0)
        f = tl.load(fr_ptr + b * stride_fb + j.to(tl.int64) * stride_fj + k * HOP + r, mask=ok, other=0.0)
        acc += f * w
        env += tl.where(ok, w * w, 0.0)
    tl.store(out_ptr + b * stride_ob + s, acc / tl.where(smask, env, 1.0), mask=smask)


def istft_overlap_add(frames: torch.Tensor, window: torch.Tensor, hop: int, start: int,
                      stop: int) -> torch.Tensor:
    """Σ_j (frames[:, j] · window) placed at j·hop, ÷ the same sum of window², samples [start, stop).

    frames: (B, J, n_fft) float32, the irfft of each spectral frame; window: (n_fft,) float32.
    """
    if frames.stride(-1) != 1:
        frames = frames.contiguous()
    bsz, j, n_fft = frames.shape
    assert n_fft % hop == 0 and window.shape == (n_fft,)
    length = max(0, stop - start)
    out = torch.empty(bsz, length, device=frames.device, dtype=torch.float32)
    if length == 0 or bsz == 0:
        return out
    block = 1024
    _istft_ola_kernel[(triton.cdiv(length, block), bsz)](
        frames, window.float().contiguous(), out, j, length, start, frames.stride(0),
        frames.stride(1), out.stride(0), HOP=hop, R=n_fft // hop, BLOCK=block, num_warps=4)
    return out
