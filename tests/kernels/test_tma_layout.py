"""The TMA layout predicate (kernels/convnext.py) on CPU tensors: it decides, on the GPU, whether a
GEMM runs on the TMA kernels or the pointer fallback."""
from __future__ import annotations

import torch

from chattts_vllm.audio.convnext import triton_kernels


def test_size_one_dims_do_not_count():
    ok = triton_kernels("convnext").tma_layout_ok
    w = torch.empty(2048, 512, dtype=torch.bfloat16)
    w3 = w.reshape(2048, 512, 1).permute(0, 2, 1).contiguous()    # a 1x1 conv weight, tap-major
    assert w3.stride() == (512, 1, 1)                              # torch keeps stride 1 there
    assert ok(w3)


def test_misaligned_strides_and_bases_fail():
    ok = triton_kernels("convnext").tma_layout_ok
    assert not ok(torch.empty(4, 100, 1026, dtype=torch.bfloat16))     # 2052-byte rows
    assert not ok(torch.empty(64, 520, dtype=torch.bfloat16)[:, 1:])    # base off by 2 bytes
    assert not ok(torch.empty(64, 64, dtype=torch.bfloat16).t())        # inner stride != 1
    assert ok(torch.empty(4, 100, 1032, dtype=torch.bfloat16)[..., :1026])


def test_unaligned_rows_are_relaid_onto_the_tma_kernel(monkeypatch):
    """A conv whose input rows are not 16-byte aligned (100 mel channels in bf16, as a streaming
    window cast from float32) must still run on the TMA kernel, as the same frames do when decoded
    whole: the pointer kernel's bf16 results differ in the last bits. tma=False still forces it."""
    k = triton_kernels("convnext")
    used = []
    monkeypatch.setattr(k, "_has_tma", lambda device: True)          # as on a Hopper GPU
    monkeypatch.setattr(k, "_launch", lambda kernel, *args, **kw: used.append(kernel))
    w = torch.randn(512, 100, 7, dtype=torch.bfloat16)
    x = torch.randn(1, 40, 100, dtype=torch.bfloat16)                # 200-byte rows
    assert not k.tma_layout_ok(x)
    k.conv_gemm(x, w)
    k.conv_gemm(x, w, tma=False)
    assert used == [k._conv_tma_kernel, k._conv_gemm_kernel]
