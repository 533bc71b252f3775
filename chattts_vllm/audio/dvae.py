"""DVAE: codes → log-mel (decode), reference waveform → codes (encode, for voice cloning).

`DVAE.safetensors` holds the Decoder layout (coef, decoder.*, out_conv) plus the encoder side:
a log-mel front end (torchaudio-compatible buffers), `downsample_conv` (×2 in time), an encoder
ConvNeXtStack (512 → 1024) and the GFSQ projections. Decode = GFSQ dequantize, then the Decoder math.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chattts_vllm.audio.convnext import ConvNeXtStack
from chattts_vllm.audio.decoder import Decoder
from chattts_vllm.audio.gfsq import GFSQ
from chattts_vllm.audio.graphs import graphed_call

SAMPLE_RATE = 24000


def mel_filterbank(n_fft: int = 1024, n_mels: int = 100, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """HTK-scale triangular filters, no area norm: (n_fft//2 + 1, n_mels), torchaudio's default."""
    f_max = sample_rate / 2 if f_max is None else f_max
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mels = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)             # band edges in Hz
    width = edges[1:] - edges[:-1]
    dist = edges.unsqueeze(0) - freqs.unsqueeze(1)               # (n_freqs, n_mels + 2)
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class MelSpectrogram(nn.Module):
    """|STFT| (centred, reflect pad, periodic Hann) → mel. Buffers at torchaudio's paths
    (`spectrogram.window`, `mel_scale.fb`) so DVAE and Vocos files load strictly."""

    def __init__(self, n_fft: int = 1024, hop_length: int = 256, n_mels: int = 100,
                 sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.spectrogram = nn.Module()
        self.spectrogram.register_buffer("window", torch.hann_window(n_fft))
        self.mel_scale = nn.Module()
        self.mel_scale.register_buffer("fb", mel_filterbank(n_fft, n_mels, sample_rate))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(..., N) float waveform → (..., n_mels, 1 + N // hop) magnitude mel."""
        window = self.spectrogram.window.float()
        shape = wav.shape
        spec = torch.stft(wav.float().reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.n_fft,
                          window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True).abs()
        mel = torch.matmul(spec.transpose(-1, -2), self.mel_scale.fb.float()).transpose(-1, -2)
        return mel.reshape(*shape[:-1], *mel.shape[-2:])


class LogMelSpectrogram(nn.Module):
    """ln(max(mel, clip)); ChatTTS clips at 1e-5, vocos' (unused) feature extractor at 1e-7."""

    def __init__(self, clip: float, **mel_kwargs):
        super().__init__()
        self.clip = clip
        self.mel_spec = MelSpectrogram(**mel_kwargs)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.clip(self.mel_spec(wav), min=self.clip))


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int, zeros: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited (Hann-windowed sinc) polyphase resampling along the last axis.

    Output length ceil(N · new / orig). The cutoff sits at `rolloff` × the lower Nyquist rate so
    downsampling does not alias; `zeros` sinc lobes on each side.
    """
    if orig_sr == new_sr:
        return wav
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g                 # output phases, input stride
    cutoff = rolloff * min(1.0, up / down)               # in cycles per input sample × 2
    half = zeros / cutoff                                # filter half-width in input samples
    pad = math.ceil(half)
    taps = torch.arange(-pad, down + pad, dtype=torch.float64)          # input offsets j
    t = torch.arange(up, dtype=torch.float64).unsqueeze(1) * down / up - taps  # phase time - j
    window = torch.where(t.abs() <= half, torch.cos(math.pi * t / (2 * half)) ** 2, 0.0)
    kernel = (cutoff * torch.sinc(cutoff * t) * window).to(wav.dtype)   # (up, taps)
    shape, n = wav.shape, wav.shape[-1]
    x = F.pad(wav.reshape(-1, 1, n), (pad, pad + down))
    y = F.conv1d(x, kernel.unsqueeze(1), stride=down)    # (batch, up phases, frames)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, : math.ceil(n * up / down)]
    return y.reshape(*shape[:-1], -1)


class DVAE(Decoder):
    """Codes (B, 4, T) → log-mel (B, 100, 2T); `encode_reference` maps a waveform to (4, T) codes."""

    def __init__(self, dim: int = 512, hidden: int = 256, n_layer: int = 12, bn_dim: int = 128,
                 levels: tuple[int, ...] = (5, 5, 5, 5), groups: int = 2, residuals: int = 2,
                 n_mels: int = 100):
        super().__init__(idim=dim, odim=dim, hidden=hidden, n_layer=n_layer, bn_dim=bn_dim,
                         n_mels=n_mels)
        self.downsample_conv = nn.Sequential(nn.Conv1d(n_mels, dim, 3, 1, 1), nn.GELU(),
                                             nn.Conv1d(dim, dim, 4, 2, 1), nn.GELU())
        self.preprocessor_mel = LogMelSpectrogram(clip=1e-5, n_mels=n_mels)
        self.encoder = ConvNeXtStack(dim, groups * dim, hidden, n_layer, bn_dim)
        self.vq_layer = GFSQ(groups * dim, levels, groups, residuals)

    @classmethod
    def from_state_dict_shapes(cls, sd: dict[str, torch.Tensor]) -> "DVAE":
        s = ConvNeXtStack.shapes_from(sd, "decoder.")
        groups = len({k.split(".")[3] for k in sd if k.startswith("vq_layer.quantizer.rvqs.")})
        return cls(dim=s["idim"], hidden=s["hidden"], n_layer=s["n_layer"], bn_dim=s["bn_dim"],
                   groups=groups, n_mels=sd["coef"].shape[1])

    @property
    def frame_dim(self) -> int:
        return self.vq_layer.groups * self.vq_layer.residuals

    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """One row of 4 codes per GPT step: (B, T, 4) → (B, 2T, n_mels) log-mel (CUDA-graph replay
        after `audio.graphs.enable_cuda_graphs(self)`)."""
        return graphed_call(self, "decode_frames", self._decode_frames, codes)

    def _decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        return self.mel_from_features(self.vq_layer.dequantize(codes).to(self.coef.dtype))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, 4, T) codes → (B, n_mels, 2T) log-mel (upstream layout)."""
        return self.decode_frames(codes.transpose(1, 2)).transpose(1, 2)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """24 kHz mono waveform (N,) → (4, (1 + N // 256) // 2) int64 codes (≈ 46.875 frames/s)."""
        mel = self.preprocessor_mel(wav) / self.coef.float().view(-1, 1)     # (n_mels, T_mel)
        x = self.downsample_conv(mel.to(self.coef.dtype))                     # (dim, T_mel // 2)
        feats = self.encoder(x.transpose(0, 1).unsqueeze(0))                  # (1, T, 2·dim)
        return self.vq_layer.quantize(feats)[0].transpose(0, 1)

    def encode_reference(self, waveform, sample_rate: int) -> torch.LongTensor:
        """Voice-cloning prompt codes (4, T) from a reference clip at any sample rate.

        Accepts a numpy array or tensor, (N,) or (channels, N) (channels are averaged), resamples to
        24 kHz, then runs the encoder. Feed the result to the `spk_smp` string encoder.
        """
        wav = torch.as_tensor(np.asarray(waveform) if not torch.is_tensor(waveform) else waveform)
        wav = wav.to(device=self.coef.device, dtype=torch.float32)
        if wav.dim() == 2:
            wav = wav.mean(dim=0)
        if wav.dim() != 1:
            raise ValueError(f"expected a (N,) or (channels, N) waveform, got {tuple(wav.shape)}")
        return self.encode(resample(wav, int(sample_rate), SAMPLE_RATE))
