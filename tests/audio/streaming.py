"""Test helper: an utterance pushed through a StreamingDecoder in a repeating pattern of block sizes."""
from __future__ import annotations

import torch

from chattts_vllm.audio.stream import StreamingDecoder


def blocks(total: int, sizes: list[int]):
    """[start, stop) frame ranges of `total` frames, cycling through `sizes`."""
    i, k = 0, 0
    while i < total:
        n = sizes[k % len(sizes)]
        yield i, min(total, i + n)
        i, k = i + n, k + 1


def stream(mel_model, vocos, frames: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, StreamingDecoder]:
    """The concatenated pushes and flush of one utterance, and the decoder (for its chunk stats)."""
    s = StreamingDecoder(mel_model, vocos)
    parts = [s.push(frames[a:b]) for a, b in blocks(frames.shape[0], sizes)]
    parts.append(s.flush())
    return torch.cat(parts), s
