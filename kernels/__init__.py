"""Triton kernels of chattts-vllm, shipped as `chattts_vllm.kernels` (see pyproject package-dir).

Each kernel's PyTorch twin is the `forward_native` of the module that calls it:
  convnext.py  fused ConvNeXt block pieces and a channels-last conv/linear GEMM (audio/convnext.py),
               whose epilogue also forms the Vocos head's complex spectrum (audio/vocoder.py)
  istft.py     the ISTFT's windowed overlap-add + envelope division (audio/vocoder.py `istft_window`)
  gfsq.py      GFSQ codes → features (audio/gfsq.py)
Importing this package does not import triton; the submodules do.
"""
