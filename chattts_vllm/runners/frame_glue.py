"""The per-step glue of model runner V2 as plain functions: PyTorch twins and the Triton switch.

`ChatTTSModelState.prepare_inputs` and `ChatTTSSampler` (mrv2.py) call either these PyTorch
functions or the fused Triton kernels of chattts_vllm/kernels/frame_glue.py (one launch each
instead of ~40 small eager ops, which at batch 1 dominate a host-bound decode step). The kernels
run when the tensors are on CUDA unless `CHATTTS_VLLM_FUSED_GLUE=0`; the tests compare both paths.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import torch

from chattts_vllm.config import AUDIO_EOS
from chattts_vllm.gpt.model import TokenInputs


def fused_glue_kernels(device: torch.device) -> ModuleType | None:
    """chattts_vllm.kernels.frame_glue where the fused glue applies (CUDA, switch on), else None."""
    if torch.device(device).type != "cuda" or os.environ.get("CHATTTS_VLLM_FUSED_GLUE", "1") == "0":
        return None
    from chattts_vllm.audio.convnext import triton_kernels  # imports triton only here

    return triton_kernels("frame_glue")


def token_embeddings_torch(embed_tokens: Callable[[torch.Tensor, TokenInputs], torch.Tensor],
                           ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                           is_code: torch.Tensor, text_len: torch.Tensor, spk_pos: torch.Tensor,
                           spk_vec: torch.Tensor, codes: torch.Tensor, trash: int) -> torch.Tensor:
    """[n, H] input embeddings of n tokens from the per-slot state, via the model's `embed_tokens`.

    ids [n] int, pos [n] int64, slot [n] int64; is_code/text_len/spk_pos [S]; spk_vec [S, H] fp32;
    codes [S, L + 1, 4] int32 with `trash` = L (positions past it read the trash column).
    """
    is_audio = is_code[slot] & (pos >= text_len[slot])
    frame = codes[slot, pos.clamp(max=trash)]
    extras = TokenInputs(codes=torch.where(is_audio.unsqueeze(1), frame, -1),
                         speaker_mask=pos == spk_pos[slot], speaker_vectors=spk_vec[slot])
    return embed_tokens(ids, extras)


def commit_and_pack_torch(codes_new: torch.Tensor, codes: torch.Tensor, is_code: torch.Tensor,
                          slot: torch.Tensor, first: torch.Tensor, frame: torch.Tensor,
                          num_sampled: torch.Tensor, hidden: torch.Tensor, trash: int,
                          eos: int = AUDIO_EOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Commits B sampled frames and packs their side-channel records (twin of the Triton kernel).

    codes_new [B, 4] int64 sampled codes; a row commits (is written to codes[slot, first + frame],
    clamped to the trash column) when its slot is a code request, it sampled (`num_sampled > 0`,
    i.e. not a chunked-prefill row) and it is not EOS. Returns (sampled ids [B] int64: EOS or code0;
    records [B, 1 + 4 + H] int32: frame + 1 (0 = no frame), the 4 codes, the fp32 hidden state bits).
    """
    is_eos = (codes_new == eos).any(dim=1)
    commit = is_code[slot] & (num_sampled > 0) & ~is_eos
    col = torch.where(commit, first + frame, torch.full_like(frame, trash)).clamp(max=trash)
    codes[slot, col] = codes_new.to(torch.int32)
    marker = torch.where(commit, frame + 1, 0)
    head = torch.cat([marker.unsqueeze(1), codes_new], dim=1).to(torch.int32)
    records = torch.cat([head, hidden.float().view(torch.int32)], dim=1)
    sampled = torch.where(is_eos, torch.full_like(codes_new[:, 0], eos), codes_new[:, 0])
    return sampled, records
