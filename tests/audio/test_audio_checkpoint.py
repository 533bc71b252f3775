"""Random audio state dicts have the official layout (keys, shapes, fp32, real spectral buffers) and
load strictly from either directory layout."""
from __future__ import annotations

import pytest
import torch
from audio_upstream import state_dicts, upstream_decoder, upstream_dvae, upstream_vocos
from safetensors.torch import save_file

from chattts_vllm.audio.checkpoint import (decoder_shapes, find_audio_file, load_audio_models,
                                           load_decoder, random_state_dict, vocos_shapes)

COUNTS = {"Decoder.safetensors": 115, "DVAE.safetensors": 242, "Vocos.safetensors": 83}
PARAMS = {"Decoder.safetensors": 25_920_740, "DVAE.safetensors": 15_083_472,
          "Vocos.safetensors": 13_584_998}
BUILD = {"Decoder.safetensors": upstream_decoder, "DVAE.safetensors": upstream_dvae,
         "Vocos.safetensors": upstream_vocos}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_official_layout(name):
    sd = state_dicts(0)[name]
    assert len(sd) == COUNTS[name]
    assert sum(t.numel() for t in sd.values()) == PARAMS[name]      # model reference, sections 13-14
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    assert all(torch.isfinite(t).all() for t in sd.values())
    ref = BUILD[name](sd).state_dict()          # loads strictly into upstream
    assert {k: tuple(v.shape) for k, v in ref.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    scales = [v for k, v in sd.items() if k.endswith((".gamma", "decoder_block.0.weight"))]
    assert scales and all(s.min() > 0.01 for s in scales)        # not the 1e-6 init


def test_spectral_buffers_are_real():
    import torchaudio

    fb = torchaudio.functional.melscale_fbanks(513, 0.0, 12000.0, 100, 24000)
    for name, prefix in (("DVAE.safetensors", "preprocessor_mel."), ("Vocos.safetensors", "feature_extractor.")):
        sd = state_dicts(0)[name]
        assert torch.equal(sd[f"{prefix}mel_spec.spectrogram.window"], torch.hann_window(1024))
        assert torch.allclose(sd[f"{prefix}mel_spec.mel_scale.fb"], fb, atol=1e-6)
    assert torch.equal(state_dicts(0)["Vocos.safetensors"]["head.istft.window"], torch.hann_window(1024))


def test_seed_changes_weights():
    a = random_state_dict(decoder_shapes(n_layer=1, hidden=8, bn_dim=4), seed=0)
    b = random_state_dict(decoder_shapes(n_layer=1, hidden=8, bn_dim=4), seed=1)
    assert not torch.equal(a["decoder.conv_in.0.weight"], b["decoder.conv_in.0.weight"])


@pytest.mark.parametrize("layout", ["chattts", ".", "asset"])
def test_load_audio_models_from_dir(tmp_path, layout):
    small = {
        "Decoder.safetensors": random_state_dict(decoder_shapes(idim=8, odim=8, hidden=8, n_layer=2, bn_dim=4)),
        "DVAE.safetensors": state_dicts(0)["DVAE.safetensors"],
        "Vocos.safetensors": random_state_dict(vocos_shapes(dim=8, intermediate=16, n_layer=2)),
    }
    d = tmp_path / layout
    d.mkdir(exist_ok=True)
    for name, sd in small.items():
        save_file(sd, str(d / name))
    models = load_audio_models(tmp_path, dtype=torch.float32)
    assert find_audio_file(tmp_path, "Vocos.safetensors").parent == d
    assert len(models.decoder.decoder.decoder_block) == 2 and len(models.vocos.backbone.convnext) == 2
    mel = models.decoder(torch.randn(1, 16, 5))
    assert models.vocos(mel).shape == (1, 512 * 5 - 256)


def test_strict_loading():
    sd = dict(random_state_dict(decoder_shapes(idim=8, odim=8, hidden=8, n_layer=1, bn_dim=4)))
    sd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        load_decoder(sd)
