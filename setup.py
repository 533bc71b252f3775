"""Builds the optional CUDA extension (csrc/) where nvcc and a CUDA torch exist; skips it elsewhere.

Everything else is declared in pyproject.toml. Without the extension, chattts_vllm.ops falls back to
the pure-PyTorch twins, so CPU installs stay plain Python.
"""
import glob
import os
import shutil

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("CHATTTS_VLLM_NO_CUDA") == "1":
        return [], {}
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        print("chattts-vllm: nvcc not found, skipping the CUDA extension (PyTorch twins are used)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        print("chattts-vllm: torch not importable at build time, skipping the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        print("chattts-vllm: torch has no CUDA, skipping the CUDA extension")
        return [], {}
    ext = CUDAExtension(
        name="chattts_vllm._C",
        sources=sources,
        # No --use_fast_math: csrc/sample_codebooks.cu must round expf/logf/powf and divisions as
        # torch's own kernels do (bit-exact twin of gpt/sampling.py); fast math changes all four.
        # CHATTTS_WITH_CUDA: csrc/frame_sink.cpp's stream-ordered push (cudaLaunchHostFunc); the
        # CPU tests build that file alone without it.
        extra_compile_args={"cxx": ["-O3", "-DCHATTTS_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
