"""Python face of the csrc ops: the fused CUDA kernel where the extension (chattts_vllm._C) is built
and the tensors are on CUDA, else its PyTorch twin.

`sample_codebooks` is one ChatTTS code-pass sampling step for B requests, 4 codebooks each:
temperature -> penalty over the last 16 codes -> top-p -> top-k (keep >= 3) -> EOS mask -> Gumbel-max
with counter noise. Twin: `gpt.sampling.sample_frames` (= `sample` on the B*4 rows). The kernel
repeats the float operations the twin runs on CUDA, so on the same batch it returns the same codes
and the same processed logits, bit for bit (csrc/sample_codebooks.cu says how). The twin's top-p
cumsum is torch's, whose association depends on the number of rows (4 B); the kernel follows it, so
compare kernel and twin on the same batch. The CPU twin rounds pow/exp/log and the cumsum its own
way: CPU and GPU codes differ only where that ulp matters (a near-tie of the noisy logits, or a
cumulative sum within an ulp of 1 - top_p).

The refine (text) pass, one row of 21,178 logits per request, stays on the twin (`gpt.sampling.sample`).
"""
from __future__ import annotations

import torch

from chattts_vllm.config import AUDIO_EOS, NUM_AUDIO_TOKENS, NUM_VQ, REPETITION_WINDOW
from chattts_vllm.gpt import sampling


def _load() -> bool:
    try:
        import chattts_vllm._C  # noqa: F401  registers torch.ops.chattts_vllm.*
    except (ImportError, OSError):
        return False
    return hasattr(torch.ops.chattts_vllm, "sample_codebooks")


HAS_CUDA_OPS = _load()

if HAS_CUDA_OPS:
    @torch.library.register_fake("chattts_vllm::sample_codebooks")
    def _sample_codebooks_fake(logits, history, slot, first_frame, num_frames, window, temperature,
                               top_p, top_k, penalty, mask_eos, seed, counter, eos_id, processed):
        return logits.new_empty((logits.shape[0], NUM_VQ), dtype=torch.int64)


def _use_kernel(logits: torch.Tensor) -> bool:
    return HAS_CUDA_OPS and logits.is_cuda


def _kernel_args(logits, temperature, top_p, top_k, penalty, mask_eos, seed, counter):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return (logits, temperature.to(torch.float32).contiguous(), top_p.to(torch.float32).contiguous(),
            top_k.to(torch.int64).contiguous(), penalty.to(torch.float32).contiguous(),
            mask_eos.to(torch.bool).contiguous(), seed.to(torch.int64).contiguous(),
            counter.to(torch.int64).contiguous())


def _check_shapes(logits: torch.Tensor, history: torch.Tensor | None) -> None:
    """Host-side shape checks before any kernel launch (bad shapes raise, never reach the GPU)."""
    if logits.dim() != 3 or tuple(logits.shape[1:]) != (NUM_VQ, NUM_AUDIO_TOKENS):
        raise ValueError(f"sample_codebooks: logits must be [B, {NUM_VQ}, {NUM_AUDIO_TOKENS}], "
                         f"got {tuple(logits.shape)}")
    if history is not None and (history.dim() != 3 or history.shape[0] != logits.shape[0]
                                or history.shape[1] != NUM_VQ):
        raise ValueError(f"sample_codebooks: history must be [B, {NUM_VQ}, W], got {tuple(history.shape)}")


def _ids(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int32)


def sample_codebooks(logits: torch.Tensor, history: torch.Tensor, temperature: torch.Tensor,
                     top_p: torch.Tensor, top_k: torch.Tensor, penalty: torch.Tensor,
                     mask_eos: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, *,
                     eos_id: int = AUDIO_EOS, processed: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [B, 4] int64 for logits [B, 4, 626] (fp32, bf16 or fp16).

    history [B, 4, W]: each codebook's last W generated codes, -1 = empty (W <= 64; ChatTTS: 16).
    temperature [B, 4]; top_p, top_k, penalty, mask_eos (step < min_new_token), seed and counter
    (the frame index: noise key) [B]. `processed` [B, 4, 626] fp32, if given, receives the processed
    logits (softmax of them is the distribution each code was drawn from).
    """
    _check_shapes(logits, history)
    if _use_kernel(logits):
        lg, *params = _kernel_args(logits, temperature, top_p, top_k, penalty, mask_eos, seed, counter)
        return torch.ops.chattts_vllm.sample_codebooks(
            lg, _ids(history), None, None, None, history.shape[-1], *params, eos_id, processed)
    return sampling.sample_frames(logits, history, temperature, top_p, top_k, penalty, mask_eos,
                                  seed, counter, eos_id, processed)


def sample_codebooks_from_buffer(logits: torch.Tensor, codes: torch.Tensor, slot: torch.Tensor,
                                 first_frame: torch.Tensor, num_frames: torch.Tensor,
                                 temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                                 penalty: torch.Tensor, mask_eos: torch.Tensor, seed: torch.Tensor,
                                 counter: torch.Tensor, *, window: int = REPETITION_WINDOW,
                                 eos_id: int = AUDIO_EOS,
                                 processed: torch.Tensor | None = None) -> torch.Tensor:
    """`sample_codebooks` with the penalty windows read straight from a per-slot code buffer.

    codes [S, T, 4] (int32/int64): request b's generated frame i at codes[slot[b], first_frame[b] + i];
    num_frames [B] frames generated so far (the window is the last min(num_frames, window) of them).
    slot, first_frame, num_frames: int64 [B]. The MRv2 layout (reference mrv2-model-state.md §7).
    """
    _check_shapes(logits, None)
    if _use_kernel(logits):
        lg, *params = _kernel_args(logits, temperature, top_p, top_k, penalty, mask_eos, seed, counter)
        return torch.ops.chattts_vllm.sample_codebooks(
            lg, _ids(codes), slot.to(torch.int64).contiguous(), first_frame.to(torch.int64).contiguous(),
            num_frames.to(torch.int64).contiguous(), window, *params, eos_id, processed)
    history = sampling.codebook_windows(codes, slot, first_frame, num_frames, window)
    return sampling.sample_frames(logits, history, temperature, top_p, top_k, penalty, mask_eos,
                                  seed, counter, eos_id, processed)
