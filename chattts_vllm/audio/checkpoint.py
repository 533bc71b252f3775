"""Audio checkpoints: the official key/shape tables, random weights in that layout, strict loaders.

The three files (`Decoder.safetensors`, `DVAE.safetensors`, `Vocos.safetensors`) keep the key names of
upstream ChatTTS and vocos 0.1.0 exactly (model reference, section 17), so the same files load into the
upstream modules and into ours. Shapes are declared here as tables; the modules derive their sizes
back from a state dict, so small test models load through the same path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

Shapes = dict[str, tuple[int, ...]]

DECODER_FILE = "Decoder.safetensors"
DVAE_FILE = "DVAE.safetensors"
VOCOS_FILE = "Vocos.safetensors"
N_MELS = 100
N_FFT = 1024


# ----------------------------------------------------------------------------------------------
# Key/shape tables
# ----------------------------------------------------------------------------------------------

def convnext_block_shapes(prefix: str, dim: int, intermediate: int, kernel: int,
                          scale_key: str) -> Shapes:
    """One ConvNeXt block; `scale_key` is "weight" (ChatTTS) or "gamma" (vocos)."""
    return {
        f"{prefix}{scale_key}": (dim,),
        f"{prefix}dwconv.weight": (dim, 1, kernel),
        f"{prefix}dwconv.bias": (dim,),
        f"{prefix}norm.weight": (dim,),
        f"{prefix}norm.bias": (dim,),
        f"{prefix}pwconv1.weight": (intermediate, dim),
        f"{prefix}pwconv1.bias": (intermediate,),
        f"{prefix}pwconv2.weight": (dim, intermediate),
        f"{prefix}pwconv2.bias": (dim,),
    }


def stack_shapes(prefix: str, idim: int, odim: int, hidden: int, n_layer: int, bn_dim: int,
                 kernel: int = 7) -> Shapes:
    """ChatTTS `DVAEDecoder` (conv_in, decoder_block.*, conv_out), used three times."""
    shapes: Shapes = {
        f"{prefix}conv_in.0.weight": (bn_dim, idim, 3),
        f"{prefix}conv_in.0.bias": (bn_dim,),
        f"{prefix}conv_in.2.weight": (hidden, bn_dim, 3),
        f"{prefix}conv_in.2.bias": (hidden,),
    }
    for i in range(n_layer):
        shapes.update(convnext_block_shapes(f"{prefix}decoder_block.{i}.", hidden, 4 * hidden,
                                            kernel, "weight"))
    shapes[f"{prefix}conv_out.weight"] = (odim, hidden, 1)
    return shapes


def mel_shapes(prefix: str, n_fft: int = N_FFT, n_mels: int = N_MELS) -> Shapes:
    """torchaudio MelSpectrogram buffers (window, filterbank), stored in DVAE and Vocos files."""
    return {f"{prefix}mel_spec.spectrogram.window": (n_fft,),
            f"{prefix}mel_spec.mel_scale.fb": (n_fft // 2 + 1, n_mels)}


def decoder_shapes(idim: int = 384, odim: int = 384, hidden: int = 512, n_layer: int = 12,
                   bn_dim: int = 128, n_mels: int = N_MELS) -> Shapes:
    shapes: Shapes = {"coef": (1, n_mels, 1)}
    shapes.update(stack_shapes("decoder.", idim, odim, hidden, n_layer, bn_dim))
    shapes["out_conv.weight"] = (n_mels, odim, 3)
    return shapes


def dvae_shapes(dim: int = 512, hidden: int = 256, n_layer: int = 12, bn_dim: int = 128,
                groups: int = 2, codebook_dim: int = 4, n_mels: int = N_MELS) -> Shapes:
    shapes: Shapes = {
        "coef": (1, n_mels, 1),
        "downsample_conv.0.weight": (dim, n_mels, 3),
        "downsample_conv.0.bias": (dim,),
        "downsample_conv.2.weight": (dim, dim, 4),
        "downsample_conv.2.bias": (dim,),
    }
    shapes.update(mel_shapes("preprocessor_mel.", n_mels=n_mels))
    shapes.update(stack_shapes("encoder.", dim, groups * dim, hidden, n_layer, bn_dim))
    shapes.update(stack_shapes("decoder.", dim, dim, hidden, n_layer, bn_dim))
    shapes["out_conv.weight"] = (n_mels, dim, 3)
    for g in range(groups):
        p = f"vq_layer.quantizer.rvqs.{g}."
        shapes.update({f"{p}project_in.weight": (codebook_dim, dim), f"{p}project_in.bias": (codebook_dim,),
                       f"{p}project_out.weight": (dim, codebook_dim), f"{p}project_out.bias": (dim,)})
    return shapes


def vocos_shapes(dim: int = 512, intermediate: int = 1536, n_layer: int = 8,
                 n_mels: int = N_MELS, n_fft: int = N_FFT) -> Shapes:
    shapes = mel_shapes("feature_extractor.", n_fft, n_mels)
    shapes.update({"backbone.embed.weight": (dim, n_mels, 7), "backbone.embed.bias": (dim,),
                   "backbone.norm.weight": (dim,), "backbone.norm.bias": (dim,)})
    for i in range(n_layer):
        shapes.update(convnext_block_shapes(f"backbone.convnext.{i}.", dim, intermediate, 7, "gamma"))
    shapes.update({"backbone.final_layer_norm.weight": (dim,), "backbone.final_layer_norm.bias": (dim,),
                   "head.out.weight": (n_fft + 2, dim), "head.out.bias": (n_fft + 2,),
                   "head.istft.window": (n_fft,)})
    return shapes


# ----------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------

def _is_norm(key: str) -> bool:
    return ".norm." in key or key.startswith("backbone.norm.") or "final_layer_norm" in key


def random_state_dict(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for a shape table.

    Variance-preserving (std 1/sqrt(fan_in)) so 12-block stacks stay O(1); layer scales drawn in
    [0.05, 0.3] (not the 1e-6 init) so every block visibly changes its input; spectral buffers hold
    their real values because the DVAE encoder uses the loaded window and filterbank.
    """
    from chattts_vllm.audio.dvae import mel_filterbank

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if key == "coef":
            t = 0.5 + torch.rand(*shape, generator=gen)
        elif leaf == "window":
            t = torch.hann_window(shape[0])                  # periodic, as torch/torchaudio default
        elif leaf == "fb":
            t = mel_filterbank(2 * (shape[0] - 1), shape[1])
        elif _is_norm(key):
            t = 1.0 + 0.1 * randn(*shape) if leaf == "weight" else 0.1 * randn(*shape)
        elif len(shape) == 1 and leaf in ("weight", "gamma"):   # layer scale
            t = 0.05 + 0.25 * torch.rand(*shape, generator=gen)
        elif leaf == "bias":
            t = 0.05 * randn(*shape)
        else:
            std = 1.0 / math.sqrt(math.prod(shape[1:]))
            if key == "head.out.weight":
                std *= 0.5                                   # log-magnitude ~ N(0, 0.25): no clip at 100
            t = std * randn(*shape)
        out[key] = t.float().contiguous()
    return out


def random_audio_state_dicts(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random Decoder, DVAE and Vocos weights with the official key names, shapes and dtype (fp32).

    Keys are file names ("Decoder.safetensors", ...); save each with `safetensors.torch.save_file`.
    """
    return {
        DECODER_FILE: random_state_dict(decoder_shapes(), seed),
        DVAE_FILE: random_state_dict(dvae_shapes(), seed + 1),
        VOCOS_FILE: random_state_dict(vocos_shapes(), seed + 2),
    }


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------

def find_audio_file(model_dir: str | Path, name: str) -> Path:
    """`<dir>/chattts/<name>` (converted model), `<dir>/<name>` or `<dir>/asset/<name>` (official)."""
    root = Path(model_dir)
    for cand in (root / "chattts" / name, root / name, root / "asset" / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{name} not found under {root} (looked in chattts/, ./, asset/)")


def _read(path_or_sd: str | Path | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_sd, dict):
        return path_or_sd
    from safetensors.torch import load_file

    return load_file(str(path_or_sd))


def _finish(module: torch.nn.Module, sd: dict[str, torch.Tensor], device, dtype) -> torch.nn.Module:
    module.load_state_dict(sd, strict=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_decoder(src, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Decoder from a `Decoder.safetensors` path or a state dict (sizes read from the shapes)."""
    from chattts_vllm.audio.decoder import Decoder

    sd = _read(src)
    return _finish(Decoder.from_state_dict_shapes(sd), sd, device, dtype)


def load_dvae(src, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """DVAE (GFSQ decode + reference encoder) from `DVAE.safetensors` or a state dict."""
    from chattts_vllm.audio.dvae import DVAE

    sd = _read(src)
    return _finish(DVAE.from_state_dict_shapes(sd), sd, device, dtype)


def load_vocos(src, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Vocos vocoder from `Vocos.safetensors` or a state dict."""
    from chattts_vllm.audio.vocoder import Vocos

    sd = _read(src)
    return _finish(Vocos.from_state_dict_shapes(sd), sd, device, dtype)


@dataclass
class AudioModels:
    decoder: torch.nn.Module
    dvae: torch.nn.Module
    vocos: torch.nn.Module


def load_audio_models(model_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> AudioModels:
    """All three audio models of a converted model dir (`<dir>/chattts/`) or an official asset dir.

    On CUDA with `CHATTTS_AUDIO_CUDA_GRAPHS=1`, their decode paths replay per-shape CUDA graphs
    (audio/graphs.py)."""
    models = AudioModels(
        decoder=load_decoder(find_audio_file(model_dir, DECODER_FILE), device, dtype),
        dvae=load_dvae(find_audio_file(model_dir, DVAE_FILE), device, dtype),
        vocos=load_vocos(find_audio_file(model_dir, VOCOS_FILE), device, dtype),
    )
    if torch.device(device).type == "cuda":
        from chattts_vllm.audio.graphs import enable_cuda_graphs, graphs_enabled_by_env

        if graphs_enabled_by_env():
            for m in (models.decoder, models.dvae, models.vocos):
                # Room for a server's warmed shapes: ~7 per stream x 7 padded batch sizes.
                enable_cuda_graphs(m, max_entries=128)
    return models
