"""Upstream reference modules (PyPI chattts 0.2.5, vocos 0.1.0) built from local state dicts.

Constructed as the model reference (section 22) describes: from `Config()` dataclasses, never through
the downloading loaders. Shared by the audio test files (imported by basename, pytest prepend mode).
"""
from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

import torch

from chattts_vllm.audio.checkpoint import random_audio_state_dicts


@lru_cache(maxsize=1)
def state_dicts(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    return random_audio_state_dicts(seed)


def upstream_decoder(sd):
    from ChatTTS.config import Config
    from ChatTTS.model.dvae import DVAE

    cfg = Config()
    m = DVAE(decoder_config=asdict(cfg.decoder), dim=cfg.decoder.idim)
    m.load_state_dict(sd)
    return m.eval()


def upstream_dvae(sd):
    from ChatTTS.config import Config
    from ChatTTS.model.dvae import DVAE

    cfg = Config()
    m = DVAE(decoder_config=asdict(cfg.dvae.decoder), encoder_config=asdict(cfg.dvae.encoder),
             vq_config=asdict(cfg.dvae.vq), dim=cfg.dvae.decoder.idim)
    m.load_state_dict(sd)
    return m.eval()


def upstream_vocos(sd):
    from ChatTTS.config import Config
    from vocos import Vocos
    from vocos.pretrained import instantiate_class

    v = Config().vocos
    m = Vocos(feature_extractor=instantiate_class((), asdict(v.feature_extractor)),
              backbone=instantiate_class((), asdict(v.backbone)),
              head=instantiate_class((), asdict(v.head)))
    m.load_state_dict(sd)
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b| (the relative error used by every audio test)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def one_thread():
    """Module fixture body: many small ops run far faster on 1 thread on the shared 2-core CI box
    (OpenMP spin under contention); the previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
