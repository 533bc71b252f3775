"""The PyPI `chattts==0.2.5` package as the numerical reference, loaded from local random weights.

Only `Chat._load` with explicit local paths is used: it checks no hashes and downloads nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_upstream_chat(asset_dir: str | Path):
    import ChatTTS

    a = Path(asset_dir)
    chat = ChatTTS.Chat()
    chat._load(vocos_ckpt_path=str(a / "Vocos.safetensors"), dvae_ckpt_path=str(a / "DVAE.safetensors"),
               gpt_ckpt_path=str(a / "gpt"), embed_path=str(a / "Embed.safetensors"),
               decoder_ckpt_path=str(a / "Decoder.safetensors"), tokenizer_path=str(a / "tokenizer"),
               device=torch.device("cpu"))
    return chat


def upstream_code_pass(chat, text: str, params) -> tuple[np.ndarray, np.ndarray]:
    """Codes [T, 4] and hidden states [T, 768] for one text, EOS frame dropped (upstream rule)."""
    out = next(iter(chat._infer_code([text], False, torch.device("cpu"), True, params)))
    return out.ids[0].numpy().astype(np.int32), out.hiddens[0].float().numpy()


def upstream_refine_ids(chat, text: str, params) -> list[int]:
    out = chat._refine_text([text], torch.device("cpu"), params)
    return out.ids[0].tolist()
