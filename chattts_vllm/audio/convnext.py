"""ConvNeXt block and the ChatTTS conv stack, shared by the Decoder, the DVAE and Vocos.

Activations are channels-last, (B, T, C): the per-frame LayerNorm and MLP then read contiguous rows,
the ×2 reshape of the Decoder becomes a free view, and the Triton kernel tiles time × channels.
`forward_native` is the PyTorch reference (the kernel's twin and the CPU path); `forward_triton`
runs the fused kernel (chattts_vllm.kernels.convnext). `backend` picks one, CustomOp style.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "native", "triton")
_DEFAULT_BACKEND = os.environ.get("CHATTTS_AUDIO_BACKEND", "auto")


def triton_kernels(name: str):
    """Import `chattts_vllm.kernels.<name>`; from a source tree without install, map `kernels/` there."""
    full = f"chattts_vllm.kernels.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name not in ("chattts_vllm.kernels", full):
            raise
    pkg_dir = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "chattts_vllm.kernels", pkg_dir / "__init__.py", submodule_search_locations=[str(pkg_dir)])
    if spec is None or not (pkg_dir / "__init__.py").is_file():
        raise ModuleNotFoundError(f"chattts_vllm.kernels not installed and {pkg_dir} missing")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["chattts_vllm.kernels"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module(full)


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Triton on CUDA by default; "native" forces PyTorch, "triton" forces the kernel."""
    backend = _DEFAULT_BACKEND if backend == "auto" else backend
    if backend == "native":
        return False
    if backend == "triton":
        return True
    return x.is_cuda and importlib.util.find_spec("triton") is not None


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Set `backend` on every submodule that has one (ConvNeXt blocks, GFSQ)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return module


def conv1d_cl(x: torch.Tensor, conv: nn.Conv1d, gelu: bool = False, scale: torch.Tensor | None = None,
              backend: str = "native") -> torch.Tensor:
    """Conv1d on channels-last (B, T, C) → (B, T', C'), then optional GELU and per-channel scale.

    The Triton path (an implicit GEMM, chattts_vllm.kernels.convnext.conv_gemm) covers stride-1
    'same'-padded convs, which are all the inference convs.
    """
    if use_triton(backend, x):
        k, d = conv.kernel_size[0], conv.dilation[0]
        assert conv.stride[0] == 1 and conv.padding[0] == d * (k // 2) and conv.groups == 1
        return triton_kernels("convnext").conv_gemm(x, conv.weight, conv.bias, dilation=d, gelu=gelu,
                                                    scale=scale)
    y = conv(x.transpose(1, 2)).transpose(1, 2)
    if gelu:
        y = F.gelu(y)
    return y if scale is None else y * scale


def layer_norm_cl(x: torch.Tensor, norm: nn.LayerNorm, backend: str = "native") -> torch.Tensor:
    """LayerNorm over channels of (B, T, C); the Triton path is the ConvNeXt LN kernel without conv."""
    if use_triton(backend, x):
        return triton_kernels("convnext").dwconv_ln(x, None, None, norm.weight, norm.bias, norm.eps)
    return norm(x)


class ConvNeXtBlock(nn.Module):
    """x + scale · pwconv2(GELU(pwconv1(LN(dwconv(x))))), on (B, T, C).

    ChatTTS blocks use dilation 2 and store the layer scale as `weight`; vocos blocks use dilation 1
    and `gamma`. The scale name is a constructor argument so both checkpoints load strictly.
    """

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int = 7, dilation: int = 1,
                 scale_key: str = "gamma", eps: float = 1e-6):
        super().__init__()
        self.dilation = dilation
        self.scale_key = scale_key
        self.backend = "auto"
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=dilation * (kernel_size // 2),
                                dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.register_parameter(scale_key, nn.Parameter(torch.ones(dim)))

    @property
    def layer_scale(self) -> torch.Tensor:
        return getattr(self, self.scale_key)

    @property
    def context(self) -> int:
        """Frames of context on each side that one output frame reads."""
        return self.dilation * (self.dwconv.kernel_size[0] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.backend, x):
            return self.forward_triton(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        y = conv1d_cl(x, self.dwconv)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y * self.layer_scale

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        k = triton_kernels("convnext")
        return k.convnext_block(
            x.contiguous(), self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias,
            self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias,
            self.layer_scale, dilation=self.dilation, eps=self.norm.eps)


class ConvNeXtStack(nn.Module):
    """ChatTTS `DVAEDecoder`: conv_in (k3, GELU, k3) → n ConvNeXt blocks (k7, dilation 2) → 1×1 conv_out.

    Serves as the Decoder body, the DVAE decoder and the DVAE encoder. (B, T, idim) → (B, T, odim).
    """

    def __init__(self, idim: int, odim: int, hidden: int = 256, n_layer: int = 12, bn_dim: int = 128,
                 kernel_size: int = 7, dilation: int = 2):
        super().__init__()
        self.conv_in = nn.Sequential(nn.Conv1d(idim, bn_dim, 3, 1, 1), nn.GELU(),
                                     nn.Conv1d(bn_dim, hidden, 3, 1, 1))
        self.decoder_block = nn.ModuleList(
            ConvNeXtBlock(hidden, 4 * hidden, kernel_size, dilation, scale_key="weight")
            for _ in range(n_layer))
        self.conv_out = nn.Conv1d(hidden, odim, 1, bias=False)
        self.backend = "auto"

    @classmethod
    def shapes_from(cls, sd: dict[str, torch.Tensor], prefix: str) -> dict[str, int]:
        """Constructor sizes read back from a state dict (so small test checkpoints load too)."""
        n_layer = len({k[len(prefix):].split(".")[1] for k in sd
                       if k.startswith(f"{prefix}decoder_block.")})
        bn_dim, idim, _ = sd[f"{prefix}conv_in.0.weight"].shape
        return dict(idim=idim, odim=sd[f"{prefix}conv_out.weight"].shape[0], bn_dim=bn_dim,
                    hidden=sd[f"{prefix}conv_in.2.weight"].shape[0], n_layer=n_layer)

    @property
    def context(self) -> int:
        return 2 + sum(b.context for b in self.decoder_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = conv1d_cl(x, self.conv_in[0], gelu=True, backend=self.backend)
        y = conv1d_cl(y, self.conv_in[2], backend=self.backend)
        for block in self.decoder_block:
            y = block(y)
        return conv1d_cl(y, self.conv_out, backend=self.backend)
