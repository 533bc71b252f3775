"""GFSQ: grouped residual finite scalar quantization, codes ↔ features.

ChatTTS quantizes the DVAE encoder output with vector_quantize_pytorch's
GroupedResidualFSQ(dim=1024, levels=(5,5,5,5), groups=2, num_quantizers=2). A frame carries 4 codes in
the order [g0r0, g0r1, g1r0, g1r1] (index = 2·group + residual). Residual level r is scaled by
(level-1)^-r, i.e. 0.25 for r = 1: the value of vector_quantize_pytorch <= 1.25.2, which the model was
trained with (1.26 changed it to 0.2). `dequantize` is the twin of the Triton kernel in
chattts_vllm.kernels.gfsq; `quantize` (voice cloning only) stays in PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from chattts_vllm.audio.convnext import triton_kernels, use_triton


class _ResidualFSQ(nn.Module):
    """One group's projections; keys `project_in` / `project_out` as in the checkpoint."""

    def __init__(self, dim: int, codebook_dim: int):
        super().__init__()
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)


class GFSQ(nn.Module):
    """(B, T, G·R) codes ↔ (B, T, dim) features, channels-last."""

    def __init__(self, dim: int = 1024, levels: tuple[int, ...] = (5, 5, 5, 5), groups: int = 2,
                 residuals: int = 2):
        super().__init__()
        self.groups, self.residuals, self.levels = groups, residuals, tuple(levels)
        self.backend = "auto"
        self.quantizer = nn.Module()      # key path vq_layer.quantizer.rvqs.{g}.project_{in,out}
        self.quantizer.rvqs = nn.ModuleList(_ResidualFSQ(dim // groups, len(levels))
                                            for _ in range(groups))
        lv = torch.tensor(levels, dtype=torch.int64)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0),
                             persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def residual_scale(self, r: int) -> torch.Tensor:
        """Per-dimension scale of residual level r: (level - 1) ** -r (0.25 at r = 1 for 5 levels)."""
        return (self._levels.float() - 1) ** -r

    def code_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Index → normalized code vector in [-1, 1]^d: mixed-radix digits, centred and halved."""
        half = (self._levels // 2).float()
        digits = (idx.unsqueeze(-1) // self._basis) % self._levels
        return (digits.float() - half) / half

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, G·R) integer codes → (B, T, dim) features.

        Per group: Σ_r scale_r · code_r, then project_out.
        """
        if use_triton(self.backend, codes):
            return self.forward_triton(codes)
        return self.forward_native(codes)

    forward = dequantize

    def forward_native(self, codes: torch.Tensor) -> torch.Tensor:
        outs = []
        for g, rvq in enumerate(self.quantizer.rvqs):
            z = 0.0
            for r in range(self.residuals):
                z = z + self.code_vectors(codes[..., g * self.residuals + r].long()) * self.residual_scale(r)
            proj = rvq.project_out
            outs.append(F.linear(z.to(proj.weight.dtype), proj.weight, proj.bias))
        return torch.cat(outs, dim=-1)

    def forward_triton(self, codes: torch.Tensor) -> torch.Tensor:
        k = triton_kernels("gfsq")
        w = torch.stack([rvq.project_out.weight for rvq in self.quantizer.rvqs])   # (G, D, d)
        b = torch.stack([rvq.project_out.bias for rvq in self.quantizer.rvqs])     # (G, D)
        return k.gfsq_dequantize(codes, w, b, levels=self.levels, residuals=self.residuals)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) features → (B, T, G·R) int64 codes (the DVAE encoder's last step).

        Per level: bound with tanh to ±(L-1)(1+1e-3)/2, round half to even, and subtract the
        quantized value from the residual. Quantization runs in fp32 like the library.
        """
        half_l = (self._levels - 1) * (1 + 1e-3) / 2
        half_w = self._levels // 2
        codes = []
        for g, rvq in enumerate(self.quantizer.rvqs):
            xg = x.chunk(self.groups, dim=-1)[g]
            residual = rvq.project_in(xg).float()
            for r in range(self.residuals):
                scale = self.residual_scale(r)
                digits_c = torch.round(torch.tanh(residual / scale) * half_l)     # centred digits
                codes.append(((digits_c + half_w) * self._basis).sum(-1).round().long())
                residual = residual - digits_c / half_w * scale
        return torch.stack(codes, dim=-1)
