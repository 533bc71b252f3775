"""Triton kernels vs their PyTorch twins, as plain functions returning a relative error.

Shared by test_kernels_interpret.py (CPU, TRITON_INTERPRET=1, small ragged shapes, fp32; run as a
script in a subprocess because the variable must be set before triton is imported) and
test_kernels_gpu.py (CUDA, real shapes, bf16 and fp32). The reference always runs in fp32 on the
same bf16-rounded weights and inputs, so a bf16 error measures only the kernel's own rounding.
Relative error = max|kernel − reference| / max|reference|.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F

from chattts_vllm.audio.checkpoint import (decoder_shapes, dvae_shapes, load_decoder, load_dvae,
                                           load_vocos, random_state_dict, vocos_shapes)
from chattts_vllm.audio.convnext import ConvNeXtBlock, set_backend, triton_kernels
from chattts_vllm.audio.gfsq import GFSQ


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(module: torch.nn.Module, device, dtype):
    """(module in `dtype` on device, fp32 copy holding the same rounded weights)."""
    low = copy.deepcopy(module).to(device=device, dtype=dtype)
    ref = copy.deepcopy(low).float()
    return low, ref


def _block(c: int, i: int, dil: int, key: str, seed: int) -> ConvNeXtBlock:
    blk = ConvNeXtBlock(c, i, 7, dil, key)
    g = _gen(seed)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 5))
        blk.norm.weight.add_(1.0)
        blk.layer_scale.uniform_(0.05, 0.3, generator=g)
    return blk


def _x(shape, device, dtype, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(device=device, dtype=dtype)


def block_case(b, t, c, i, dil, key, mlp, device, dtype, seed=0) -> float:
    low, ref = _pair(_block(c, i, dil, key, seed), device, dtype)
    x = _x((b, t, c), device, dtype, seed + 1)
    k = triton_kernels("convnext")
    out = k.convnext_block(x, low.dwconv.weight, low.dwconv.bias, low.norm.weight, low.norm.bias,
                           low.pwconv1.weight, low.pwconv1.bias, low.pwconv2.weight, low.pwconv2.bias,
                           low.layer_scale, dilation=dil, eps=low.norm.eps, mlp=mlp)
    return rel(out, ref.forward_native(x.float()))


def dwconv_ln_case(b, t, c, dil, conv, device, dtype, seed=0) -> float:
    low, ref = _pair(_block(c, 4 * c, dil, "gamma", seed), device, dtype)
    x = _x((b, t, c), device, dtype, seed + 1)
    k = triton_kernels("convnext")
    if conv:
        out = k.dwconv_ln(x, low.dwconv.weight, low.dwconv.bias, low.norm.weight, low.norm.bias,
                          low.norm.eps, dil)
        xr = F.conv1d(x.float().transpose(1, 2), ref.dwconv.weight, ref.dwconv.bias,
                      padding=ref.dwconv.padding, dilation=dil, groups=c).transpose(1, 2)
    else:
        out = k.dwconv_ln(x, None, None, low.norm.weight, low.norm.bias, low.norm.eps)
        xr = x.float()
    return rel(out, ref.norm(xr))


def conv_case(b, t, cin, cout, ks, device, dtype, gelu=False, scale=False, residual=False,
              padded_input=False, tma=None, config=None, seed=0) -> float:
    """conv_gemm (k taps, or a linear when ks == 0) with its epilogue options."""
    g = _gen(seed)
    conv = torch.nn.Conv1d(cin, cout, max(ks, 1), padding=max(ks, 1) // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin * max(ks, 1)) ** 0.5)
    low, ref = _pair(conv, device, dtype)
    x = _x((b, t, cin + 4 * padded_input), device, dtype, seed + 1)[..., :cin]    # a padded-stride view
    s = _x((cout,), device, dtype, seed + 2).abs() + 0.5 if scale else None
    r = _x((b, t, cout), device, dtype, seed + 3) if residual else None
    weight = low.weight.squeeze(-1) if ks == 0 else low.weight
    out = triton_kernels("convnext").conv_gemm(x, weight, low.bias, gelu=gelu, scale=s, residual=r, tma=tma,
                                               config=config)
    y = ref(x.float().transpose(1, 2)).transpose(1, 2)
    y = F.gelu(y) if gelu else y
    y = y * s.float() if scale else y
    y = y + r.float() if residual else y
    return rel(out, y)


def spectrum_case(b, t, dim, n_fft, device, dtype, tma=None, seed=0) -> float:
    """The ISTFT head's GEMM with the spectrum epilogue vs `ISTFTHead.spectrum` (native)."""
    from chattts_vllm.audio.vocoder import ISTFTHead

    head = ISTFTHead(dim, n_fft, n_fft // 4)
    g = _gen(seed)
    with torch.no_grad():
        head.out.weight.copy_(torch.randn(head.out.weight.shape, generator=g) / dim ** 0.5)
        head.out.bias.copy_(torch.randn(head.out.bias.shape, generator=g) * 0.5)
    low, ref = _pair(head, device, dtype)
    x = _x((b, t, dim), device, dtype, seed + 1)
    out = triton_kernels("convnext").conv_gemm(x, low.out.weight, low.out.bias, out_dtype=torch.float32,
                                               spectrum=True, tma=tma)
    set_backend(ref, "native")
    want = ref.spectrum(x.float())
    assert out.shape == want.shape and out.dtype == torch.complex64
    return rel(torch.view_as_real(out), torch.view_as_real(want))


def istft_case(b, j, n_fft, hop, first, last, device, seed=0) -> float:
    """Windowed overlap-add kernel (after the same irfft) vs `istft_window`, fp32."""
    from chattts_vllm.audio.vocoder import ISTFT

    ist = ISTFT(n_fft, hop).to(device)
    g = _gen(seed)
    spec = torch.complex(torch.randn(b, j, n_fft // 2 + 1, generator=g),
                         torch.randn(b, j, n_fft // 2 + 1, generator=g)).to(device)
    want = ist.forward_native(spec, first, last)
    got = ist.forward_triton(spec, first, last)
    assert got.shape == want.shape, (got.shape, want.shape)
    return rel(got, want) if want.numel() else 0.0


def fused_mlp_case(b, t, c, i, tma, device, dtype, seed=0) -> float:
    low, ref = _pair(_block(c, i, 1, "gamma", seed), device, dtype)
    y = _x((b, t, c), device, dtype, seed + 1)
    x = _x((b, t, c), device, dtype, seed + 2)
    out = triton_kernels("convnext").fused_mlp(y, low.pwconv1.weight, low.pwconv1.bias, low.pwconv2.weight,
                                               low.pwconv2.bias, low.layer_scale, x, tma=tma)
    want = x.float() + ref.layer_scale * ref.pwconv2(F.gelu(ref.pwconv1(y.float())))
    return rel(out, want)


def gfsq_case(b, t, dim, device, dtype, seed=0) -> float:
    q = GFSQ(dim)
    g = _gen(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    low, ref = _pair(q, device, dtype)
    codes = torch.randint(0, 625, (b, 4, t), generator=g).to(device).transpose(1, 2)   # strided view
    return rel(low.forward_triton(codes), ref.forward_native(codes))


def _models(real: bool, seed: int = 0):
    if real:
        from chattts_vllm.audio.checkpoint import random_audio_state_dicts

        sd = random_audio_state_dicts(seed)
        return (load_decoder(sd["Decoder.safetensors"]), load_dvae(sd["DVAE.safetensors"]),
                load_vocos(sd["Vocos.safetensors"]))
    return (load_decoder(random_state_dict(decoder_shapes(idim=24, odim=40, hidden=48, n_layer=2, bn_dim=24), seed)),
            load_dvae(random_state_dict(dvae_shapes(dim=40, hidden=48, n_layer=2, bn_dim=24), seed + 1)),
            load_vocos(random_state_dict(vocos_shapes(dim=48, intermediate=80, n_layer=2), seed + 2)))


@torch.inference_mode()
def model_case(b, t, real, device, dtype, mlp="split", seed=0, backend="triton") -> dict[str, float]:
    """Whole Decoder → Vocos and DVAE → Vocos in `backend` at `dtype` vs PyTorch fp32 (same weights).

    backend="native" measures PyTorch's own error at `dtype` (the yardstick for bf16)."""
    k = triton_kernels("convnext")
    old, k.MLP_MODE = k.MLP_MODE, mlp
    try:
        dec, dvae, voc = _models(real, seed)
        hidden = _x((b, 2 * dec.decoder.conv_in[0].in_channels, t), device, torch.float32, seed)
        codes = torch.randint(0, 625, (b, 4, t), generator=_gen(seed)).to(device)
        out = {}
        for name, mel_model, inp in (("decoder", dec, hidden), ("dvae", dvae, codes)):
            low, ref = _pair(mel_model, device, dtype)
            vlow, vref = _pair(voc, device, dtype)
            set_backend(ref, "native"), set_backend(vref, "native")
            set_backend(low, backend), set_backend(vlow, backend)
            x_low = inp.to(dtype) if inp.is_floating_point() else inp
            x_ref = x_low.float() if inp.is_floating_point() else inp
            mel_low, mel_ref = low(x_low), ref(x_ref)
            out[f"{name}_mel"] = rel(mel_low, mel_ref)
            out[f"{name}_wav"] = rel(vlow(mel_low), vref(mel_ref))
        return out
    finally:
        k.MLP_MODE = old


def interpreter_cases() -> dict[str, float]:
    """Small ragged shapes, fp32, CPU: every kernel and both code paths (TMA and pointers)."""
    cpu, f32 = "cpu", torch.float32
    res = {
        "dwconv_ln_dil2": dwconv_ln_case(2, 37, 48, 2, True, cpu, f32),
        "dwconv_ln_c37": dwconv_ln_case(1, 23, 37, 1, True, cpu, f32),
        "layer_norm": dwconv_ln_case(2, 19, 48, 1, False, cpu, f32),
        "gfsq": gfsq_case(2, 21, 80, cpu, f32),
        "fused_mlp_tma": fused_mlp_case(2, 27, 64, 136, True, cpu, f32),
        "fused_mlp_ptr": fused_mlp_case(2, 27, 48, 80, False, cpu, f32),
    }
    for tma in (True, False):
        tag = "tma" if tma else "ptr"
        res[f"linear_gelu_{tag}"] = conv_case(2, 37, 48, 80, 0, cpu, f32, gelu=True, tma=tma)
        res[f"linear_scale_res_{tag}"] = conv_case(2, 37, 80, 48, 0, cpu, f32, scale=True, residual=True, tma=tma)
        res[f"conv3_gelu_{tag}"] = conv_case(2, 45, 24, 40, 3, cpu, f32, gelu=True, tma=tma)
        res[f"conv7_padded_in_{tag}"] = conv_case(2, 29, 20, 48, 7, cpu, f32, padded_input=True, tma=tma)
        res[f"conv3_scale_{tag}"] = conv_case(1, 70, 40, 36, 3, cpu, f32, scale=True, tma=tma)
    res["linear_gelu_tma_grid"] = conv_case(2, 37, 48, 80, 0, cpu, f32, gelu=True, tma=True,
                                            config={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32,
                                                    "GROUP_M": 4, "PERSISTENT": False})
    res["spectrum_tma"] = spectrum_case(2, 23, 40, 64, cpu, f32, tma=True)
    res["spectrum_ptr"] = spectrum_case(1, 19, 40, 64, cpu, f32, tma=False)
    for first in (True, False):
        for last in (True, False):
            res[f"istft_first{int(first)}_last{int(last)}"] = istft_case(2, 9, 64, 16, first, last, cpu)
    res["istft_one_frame"] = istft_case(1, 1, 64, 16, True, True, cpu)
    for mlp in ("split", "fused"):
        res[f"block_weight_dil2_{mlp}"] = block_case(2, 41, 64, 136, 2, "weight", mlp, cpu, f32)
        res[f"block_gamma_dil1_{mlp}"] = block_case(1, 33, 48, 80, 1, "gamma", mlp, cpu, f32)
    res.update({f"model_{k}": v for k, v in model_case(2, 21, False, cpu, f32).items()})
    # 1-2 frame utterances (boxes larger than the tensor), on freshly built modules each time: this
    # also guards the re-laid-weight cache against a freed weight's address being reused.
    for t in (1, 2):
        for mlp in ("split", "fused"):
            res[f"model_tiny_t{t}_{mlp}"] = max(model_case(1, t, False, cpu, f32, mlp=mlp).values())
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    with torch.no_grad():
        json.dump(interpreter_cases(), sys.stdout)
