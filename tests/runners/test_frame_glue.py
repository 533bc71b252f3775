"""CPU checks of the MRv2 glue switch and of the code heads as one GEMM (gpt/model.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from chattts_vllm.gpt.model import ChatTTSForCausalLM
from chattts_vllm.runners.frame_glue import fused_glue_kernels

H, CODES = 48, 626


class _Heads(nn.Module):
    """ChatTTSForCausalLM's real code-head methods on bare heads (no vLLM config needed)."""

    code_logits = ChatTTSForCausalLM.code_logits
    _code_head_weight = ChatTTSForCausalLM._code_head_weight

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_audio_tokens=CODES)
        self.head_code = nn.ModuleList(nn.Linear(H, CODES, bias=False) for _ in range(4))
        self._code_weight = None


def _stacked(m: _Heads, x: torch.Tensor) -> torch.Tensor:
    """The former implementation: four GEMMs and a stack."""
    return torch.stack([h(x) for h in m.head_code], dim=1).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_code_heads_one_gemm_matches_four():
    torch.manual_seed(0)
    m, x = _Heads(), torch.randn(37, H)
    got = m.code_logits(x)
    assert got.shape == (37, 4, CODES) and got.dtype == torch.float32
    assert _rel(got, _stacked(m, x)) <= 1e-6
    cat = m._code_weight
    # In-place updates (weight loading writes param.data) reach the fused weight.
    m.head_code[2].weight.data.copy_(torch.randn(CODES, H))
    assert m._code_head_weight() is cat and _rel(m.code_logits(x), _stacked(m, x)) <= 1e-6
    # A replaced parameter or a dtype change rebuilds it.
    m.head_code[1].weight = nn.Parameter(torch.randn(CODES, H))
    assert _rel(m.code_logits(x), _stacked(m, x)) <= 1e-6 and m._code_weight is not cat
    m.double()
    assert _rel(m.code_logits(x.double()), _stacked(m, x.double())) <= 1e-12


def test_fused_glue_switch(monkeypatch):
    assert fused_glue_kernels(torch.device("cpu")) is None
    monkeypatch.setenv("CHATTTS_VLLM_FUSED_GLUE", "0")
    assert fused_glue_kernels(torch.device("cuda")) is None


@pytest.mark.gpu
def test_fused_glue_on_by_default_on_cuda(monkeypatch):
    monkeypatch.delenv("CHATTTS_VLLM_FUSED_GLUE", raising=False)
    assert fused_glue_kernels(torch.device("cuda")) is not None
