"""Decoder: GPT hidden states → log-mel, the default path (`Decoder.safetensors`).

Each 768-d hidden state yields two mel frames: its first half drives frame 2t, its second half frame
2t+1 (the "×2 reshape", no learned upsampler). In channels-last layout that reshape is a view:
(B, T, 2·idim) → (B, 2T, idim). Then ConvNeXtStack(idim → odim), out_conv (k3, no bias) and a
per-mel-bin scale `coef`. The DVAE decode path is the same module fed with GFSQ features.
"""
from __future__ import annotations

import torch
from torch import nn

from chattts_vllm.audio.convnext import ConvNeXtStack, conv1d_cl
from chattts_vllm.audio.graphs import graphed_call


class Decoder(nn.Module):
    """(B, 2·idim, T) frames → (B, n_mels, 2T) log-mel; `decode_frames` is the channels-last core."""

    def __init__(self, idim: int = 384, odim: int = 384, hidden: int = 512, n_layer: int = 12,
                 bn_dim: int = 128, n_mels: int = 100):
        super().__init__()
        self.register_buffer("coef", torch.ones(1, n_mels, 1))
        self.decoder = ConvNeXtStack(idim, odim, hidden, n_layer, bn_dim)
        self.out_conv = nn.Conv1d(odim, n_mels, 3, 1, 1, bias=False)
        self.backend = "auto"

    @classmethod
    def from_state_dict_shapes(cls, sd: dict[str, torch.Tensor]) -> "Decoder":
        return cls(**ConvNeXtStack.shapes_from(sd, "decoder."), n_mels=sd["coef"].shape[1])

    @property
    def context(self) -> int:
        """Mel frames of context each side: one output mel frame reads input rows m ± context."""
        return self.decoder.context + self.out_conv.kernel_size[0] // 2

    @property
    def frame_dim(self) -> int:
        """Width of one input frame (768 for the GPT hidden states)."""
        return 2 * self.decoder.conv_in[0].in_channels

    def mel_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, 2·idim) → (B, 2T, n_mels), channels-last."""
        b, t, c = x.shape
        y = self.decoder(x.reshape(b, 2 * t, c // 2))      # ×2 reshape: a view in this layout
        return conv1d_cl(y, self.out_conv, scale=self.coef.view(-1), backend=self.backend)

    def decode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """One row per GPT step: (B, T, 768) hidden states → (B, 2T, n_mels) log-mel.

        Replayed from a CUDA graph per shape after `audio.graphs.enable_cuda_graphs(self)`."""
        return graphed_call(self, "decode_frames", self._decode_frames, frames)

    def _decode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.mel_from_features(frames.to(self.coef.dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 768, T) hidden states → (B, n_mels, 2T) log-mel (upstream layout)."""
        return self.decode_frames(hidden.transpose(1, 2)).transpose(1, 2)
