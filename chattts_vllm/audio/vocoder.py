"""Vocos (vocos 0.1.0, ChatTTS config): log-mel → 24 kHz waveform, 256·(T_mel − 1) samples.

Backbone: embed Conv1d(100 → 512, k7) → LayerNorm → 8 ConvNeXt blocks (dilation 1, scale `gamma`)
→ final LayerNorm. Head: Linear(512 → 1026) split into log-magnitude and phase, then an inverse STFT
(n_fft 1024, hop 256, periodic Hann, centred). The ISTFT is written as "complete samples of a window
of frames" so that the streaming decoder (stream.py) reuses the exact same math on windows.
"""
from __future__ import annotations

import torch
from torch import nn

from chattts_vllm.audio.convnext import (ConvNeXtBlock, conv1d_cl, layer_norm_cl, triton_kernels,
                                          use_triton)
from chattts_vllm.audio.dvae import LogMelSpectrogram
from chattts_vllm.audio.graphs import graphed_call


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """(B, J, n_fft) frames → (B, (J − 1)·hop + n_fft) sum, frame j placed at j·hop (n_fft = R·hop)."""
    b, j, n_fft = frames.shape
    r = n_fft // hop
    out = frames.new_zeros(b, j + r - 1, hop)
    for k in range(r):                    # R shifted adds of hop-wide slices: no fold/col2im needed
        out[:, k:k + j] += frames[:, :, k * hop:(k + 1) * hop]
    return out.flatten(1)


def istft_bounds(n_frames: int, n_fft: int, hop: int, first: bool, last: bool) -> tuple[int, int]:
    """[start, stop) of the complete samples of a run of `n_frames` frames, in overlap-add coordinates."""
    start = n_fft // 2 if first else n_fft - hop
    stop = (n_frames - 1) * hop + n_fft // 2 if last else n_frames * hop
    return start, stop


def istft_window(spec: torch.Tensor, window: torch.Tensor, hop: int, first: bool,
                 last: bool) -> torch.Tensor:
    """Complete output samples of a run of frames (B, J, n_fft//2+1), complex.

    A sample is complete when every frame overlapping it is in the run, or when it lies beyond the
    true start (`first`) / end (`last`) of the signal. Returns output samples
    [0 if first else (j0 + 1)·hop, (j0 + J − 1)·hop if last else (j0 + J)·hop − n_fft/2), j0 = the
    run's first frame; with first = last = True this is torch.istft(center=True).
    """
    n_fft = window.shape[0]
    frames = torch.fft.irfft(spec, n=n_fft, dim=-1) * window              # (B, J, n_fft)
    y = overlap_add(frames, hop)
    env = overlap_add((window * window).expand(1, spec.shape[1], n_fft), hop)   # window envelope
    start, stop = istft_bounds(spec.shape[1], n_fft, hop, first, last)
    return y[:, start:stop] / env[:, start:stop]


class ISTFT(nn.Module):
    """Inverse STFT, centred; holds the `window` buffer of `head.istft`.

    `forward_native` is `istft_window`; `forward_triton` keeps cuFFT's irfft and runs the windowed
    overlap-add and envelope division as one kernel (chattts_vllm.kernels.istft).
    """

    def __init__(self, n_fft: int = 1024, hop_length: int = 256):
        super().__init__()
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft))
        self.backend = "auto"

    def forward(self, spec: torch.Tensor, first: bool = True, last: bool = True) -> torch.Tensor:
        """(B, J, n_fft//2+1) complex frames → waveform (see `istft_window`)."""
        if use_triton(self.backend, spec):
            return self.forward_triton(spec, first, last)
        return self.forward_native(spec, first, last)

    def forward_native(self, spec: torch.Tensor, first: bool = True, last: bool = True) -> torch.Tensor:
        return istft_window(spec, self.window.float(), self.hop_length, first, last)

    def forward_triton(self, spec: torch.Tensor, first: bool = True, last: bool = True) -> torch.Tensor:
        n_fft = self.window.shape[0]
        frames = torch.fft.irfft(spec, n=n_fft, dim=-1)
        start, stop = istft_bounds(spec.shape[1], n_fft, self.hop_length, first, last)
        return triton_kernels("istft").istft_overlap_add(frames, self.window.float(), self.hop_length,
                                                         start, stop)


class ISTFTHead(nn.Module):
    """Linear → (log-magnitude, phase) → complex spectrum → ISTFT."""

    def __init__(self, dim: int = 512, n_fft: int = 1024, hop_length: int = 256):
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length)
        self.backend = "auto"

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) → (B, T, n_fft//2+1) complex64; the magnitude is capped at 100 like vocos."""
        if use_triton(self.backend, x):
            # One GEMM whose epilogue (fp32: exp() of a bf16 log-magnitude is coarse) writes the
            # complex spectrum: the math below, fused (chattts_vllm.kernels.convnext `_spectrum`).
            return triton_kernels("convnext").conv_gemm(x, self.out.weight, self.out.bias,
                                                        out_dtype=torch.float32, spectrum=True)
        y = self.out(x).float()
        mag, phase = y.chunk(2, dim=-1)
        mag = torch.clip(torch.exp(mag), max=1e2)
        return torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.istft(self.spectrum(x))


class VocosBackbone(nn.Module):
    """(B, T, n_mels) → (B, T, dim), channels-last."""

    def __init__(self, input_channels: int = 100, dim: int = 512, intermediate_dim: int = 1536,
                 num_layers: int = 8):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 7, 1, scale_key="gamma")
                                      for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.backend = "auto"

    @property
    def context(self) -> int:
        return self.embed.kernel_size[0] // 2 + sum(b.context for b in self.convnext)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = layer_norm_cl(conv1d_cl(mel, self.embed, backend=self.backend), self.norm, self.backend)
        for block in self.convnext:
            x = block(x)
        return layer_norm_cl(x, self.final_layer_norm, self.backend)


class Vocos(nn.Module):
    """(B, n_mels, T_mel) log-mel → (B, 256·(T_mel − 1)) float32 waveform at 24 kHz."""

    def __init__(self, dim: int = 512, intermediate_dim: int = 1536, num_layers: int = 8,
                 n_mels: int = 100, n_fft: int = 1024, hop_length: int = 256):
        super().__init__()
        # Unused at inference; kept because its buffers are in the checkpoint (log clip 1e-7).
        self.feature_extractor = LogMelSpectrogram(clip=1e-7, n_fft=n_fft, hop_length=hop_length,
                                                   n_mels=n_mels)
        self.backbone = VocosBackbone(n_mels, dim, intermediate_dim, num_layers)
        self.head = ISTFTHead(dim, n_fft, hop_length)

    @classmethod
    def from_state_dict_shapes(cls, sd: dict[str, torch.Tensor]) -> "Vocos":
        dim, n_mels, _ = sd["backbone.embed.weight"].shape
        n_layer = len({k.split(".")[2] for k in sd if k.startswith("backbone.convnext.")})
        return cls(dim=dim, intermediate_dim=sd["backbone.convnext.0.pwconv1.weight"].shape[0],
                   num_layers=n_layer, n_mels=n_mels, n_fft=sd["head.istft.window"].shape[0])

    @property
    def context(self) -> int:
        """Mel frames of context on each side of one spectral frame."""
        return self.backbone.context

    @property
    def hop_length(self) -> int:
        return self.head.istft.hop_length

    def spectrum(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, T_mel, n_mels) channels-last log-mel → (B, T_mel, n_fft//2+1) complex frames."""
        return graphed_call(self, "spectrum", self._spectrum, mel)

    def _spectrum(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head.spectrum(self.backbone(mel.to(self.head.out.weight.dtype)))

    def decode_frames(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, T_mel, n_mels) channels-last → (B, hop·(T_mel − 1)) waveform (CUDA-graph replay per
        shape after `audio.graphs.enable_cuda_graphs(self)`)."""
        return graphed_call(self, "decode_frames", self._decode_frames, mel)

    def _decode_frames(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head.istft(self._spectrum(mel))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.decode_frames(mel.transpose(1, 2))
