"""Checkpoints: the official `2Noise/ChatTTS` `asset/` layout -> a folder vLLM loads.

Official layout (HF repo `2Noise/ChatTTS`, folder `asset/`): `gpt/config.json` + `gpt/model.safetensors`
(LlamaModel keys without prefix, plus an unused `embed_tokens`), `Embed.safetensors` (text/code
embeddings and five weight-normed heads), `Decoder`/`DVAE`/`Vocos.safetensors`, `tokenizer/`,
and the legacy `spk_stat.pt` (speaker std and mean).

Converted layout: `config.json` (model_type "chattts"), ONE `model.safetensors` with vLLM names and
folded heads, the tokenizer files, and the audio stages under `chattts/`: vLLM globs every top-level
`*.safetensors` as model weights, so nothing else may sit there.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from chattts_vllm.config import HIDDEN_SIZE, NUM_AUDIO_TOKENS, NUM_TEXT_TOKENS, NUM_VQ
from chattts_vllm.text.prompt import TOKENIZER_FILES, packaged_tokenizer_dir
from chattts_vllm.text.speaker import (LEGACY_SPEAKER_STATS_FILE, SPEAKER_STATS_FILE,
                                       SpeakerStats)

ARCHITECTURE = "ChatTTSForCausalLM"
AUDIO_FILES = ("Decoder.safetensors", "DVAE.safetensors", "Vocos.safetensors")
AUDIO_DIR = "chattts"  # inside a converted dir
ASSET_FILES = ("gpt/config.json", "gpt/model.safetensors", "Embed.safetensors", *AUDIO_FILES)

# `asset/gpt/config.json` exactly as published (762 bytes, sha256 0aaa1ecd...a0c236 at 20 layers).
OFFICIAL_GPT_CONFIG = {
    "architectures": ["LlamaModel"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 4096,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 12, "num_audio_tokens": 626,
    "num_hidden_layers": 20, "num_key_value_heads": 12, "num_text_tokens": 21178, "num_vq": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "spk_KL": False, "spk_emb_dim": 192, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.41.2", "use_cache": False, "vocab_size": 32000,
}

_LAYER_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
               "input_layernorm", "post_attention_layernorm")
_HEADS = ("head_text", *(f"head_code.{k}" for k in range(NUM_VQ)))


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _json_dump(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors without metadata, written under a temporary name so a crash leaves no half file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600 files; models are usually shared
    os.replace(tmp, path)


def backbone_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Llama backbone keys (official names, no prefix) -> shapes, without `embed_tokens`."""
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (h // cfg["num_attention_heads"])
    per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, h), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h),
           "mlp.down_proj": (h, ff), "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    shapes = {f"layers.{i}.{k}.weight": per[k]
              for i in range(cfg["num_hidden_layers"]) for k in _LAYER_KEYS}
    shapes["norm.weight"] = (h,)
    return shapes


def embed_shapes() -> dict[str, tuple[int, ...]]:
    """Converted (folded) embedding and head keys -> shapes."""
    shapes = {"emb_text.weight": (NUM_TEXT_TOKENS, HIDDEN_SIZE),
              "head_text.weight": (NUM_TEXT_TOKENS, HIDDEN_SIZE)}
    for k in range(NUM_VQ):
        shapes[f"emb_code.{k}.weight"] = (NUM_AUDIO_TOKENS, HIDDEN_SIZE)
        shapes[f"head_code.{k}.weight"] = (NUM_AUDIO_TOKENS, HIDDEN_SIZE)
    return shapes


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W = g * v / ||v||_2 per output row (weight_norm with dim=0), in fp32.

    Uses the kernel behind `torch.nn.utils.parametrizations.weight_norm`, so the folded weight is
    bit-identical to the one upstream computes on every forward.
    """
    return torch._weight_norm(v.float(), g.float(), 0)


# -- random weights in the official layout ----------------------------------------------------

def _random_speaker_stats(g: torch.Generator) -> torch.Tensor:
    """(1536,) fp16: 768 std (lognormal, mean 3.75, heavy tail) then 768 mean (mean 0.017)."""
    std = torch.exp(0.67 * torch.randn(HIDDEN_SIZE, generator=g)).mul_(3.0).clamp_(1.5, 16.0)
    std *= 3.75 / std.mean()
    mean = 1.67 * torch.randn(HIDDEN_SIZE, generator=g)
    mean += 0.017 - mean.mean()
    return torch.cat([std, mean]).half()


def write_random_asset(asset_dir: str | Path, *, num_layers: int = 20, seed: int = 0,
                       progress: bool = False) -> Path:
    """Random fp32 weights in the exact official `asset/` layout (keys, shapes, file names).

    Matrices ~ N(0, 0.02), norms = 1, head gains g ~ U(0.5, 1.5): the folded heads then give
    logits with a standard deviation near g on a unit-RMS hidden state, so sampling on random
    weights has spread rather than ties.
    """
    from chattts_vllm.audio.checkpoint import random_audio_state_dicts

    asset = Path(asset_dir)
    (asset / "gpt").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, 0.02, generator=g)

    bar = tqdm(total=5, desc="random asset", unit="file", disable=not progress)
    cfg = dict(OFFICIAL_GPT_CONFIG, num_hidden_layers=num_layers)
    _json_dump(cfg, asset / "gpt" / "config.json")
    gpt = {"embed_tokens.weight": normal(cfg["vocab_size"], HIDDEN_SIZE)}
    for name, shape in backbone_shapes(cfg).items():
        gpt[name] = torch.ones(shape) if len(shape) == 1 else normal(*shape)
    _save(gpt, asset / "gpt" / "model.safetensors")
    del gpt
    bar.update()

    embed = {"emb_text.weight": normal(NUM_TEXT_TOKENS, HIDDEN_SIZE)}
    for k in range(NUM_VQ):
        embed[f"emb_code.{k}.weight"] = normal(NUM_AUDIO_TOKENS, HIDDEN_SIZE)
    for head in _HEADS:
        rows = NUM_TEXT_TOKENS if head == "head_text" else NUM_AUDIO_TOKENS
        embed[f"{head}.parametrizations.weight.original0"] = torch.empty(rows, 1).uniform_(
            0.5, 1.5, generator=g)
        embed[f"{head}.parametrizations.weight.original1"] = normal(rows, HIDDEN_SIZE)
    _save(embed, asset / "Embed.safetensors")
    del embed
    bar.update()

    for name, state_dict in random_audio_state_dicts(seed).items():
        _save(state_dict, asset / name)
    bar.update(3)
    bar.close()

    (asset / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(packaged_tokenizer_dir() / name, asset / "tokenizer" / name)
    torch.save(_random_speaker_stats(g), asset / LEGACY_SPEAKER_STATS_FILE)
    return asset


# -- conversion -------------------------------------------------------------------------------

def converted_config(gpt_cfg: dict) -> dict:
    """config.json of a converted checkpoint: a LlamaConfig plus the ChatTTS fields."""
    theta = float(gpt_cfg.get("rope_theta", 10000.0))
    return {
        "architectures": [ARCHITECTURE], "model_type": "chattts",
        "hidden_size": gpt_cfg["hidden_size"], "intermediate_size": gpt_cfg["intermediate_size"],
        "num_hidden_layers": gpt_cfg["num_hidden_layers"],
        "num_attention_heads": gpt_cfg["num_attention_heads"],
        "num_key_value_heads": gpt_cfg.get("num_key_value_heads", gpt_cfg["num_attention_heads"]),
        "head_dim": gpt_cfg["hidden_size"] // gpt_cfg["num_attention_heads"],
        "hidden_act": gpt_cfg.get("hidden_act", "silu"),
        "rms_norm_eps": gpt_cfg.get("rms_norm_eps", 1e-6),
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": gpt_cfg["max_position_embeddings"],
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "vocab_size": gpt_cfg.get("num_text_tokens", NUM_TEXT_TOKENS),
        "num_vq": gpt_cfg.get("num_vq", NUM_VQ),
        "num_audio_tokens": gpt_cfg.get("num_audio_tokens", NUM_AUDIO_TOKENS),
        "num_text_tokens": gpt_cfg.get("num_text_tokens", NUM_TEXT_TOKENS),
        # Explicit nulls: LlamaConfig would default to bos 1 / eos 2, and vLLM turns the model
        # config's eos into a stop token when there is no generation_config.json.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "torch_dtype": "float32", "dtype": "float32",
    }


def _load_speaker_stats(asset: Path, speaker_stats: str | Path | None) -> SpeakerStats:
    if (asset / LEGACY_SPEAKER_STATS_FILE).is_file():
        return SpeakerStats.load(asset / LEGACY_SPEAKER_STATS_FILE)
    if speaker_stats is not None:
        return SpeakerStats.load(speaker_stats)
    raise FileNotFoundError(
        f"no speaker statistics: {asset / LEGACY_SPEAKER_STATS_FILE} is missing; pass "
        "--speaker-stats FILE (a .pt tensor of 1536 values, std then mean, or a .safetensors "
        "with 'std' and 'mean')")


def _converted_weights(asset: Path, cfg: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    want = backbone_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(asset / "gpt" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        extra, missing = keys - set(want) - {"embed_tokens.weight"}, set(want) - keys
        if extra or missing:
            raise ValueError(f"gpt/model.safetensors does not match gpt/config.json "
                             f"({cfg['num_hidden_layers']} layers): missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        for name in want:
            out[f"model.{name}"] = f.get_tensor(name).float()

    heads = {f"{h}.parametrizations.weight.original{i}" for h in _HEADS for i in (0, 1)}
    with safe_open(str(asset / "Embed.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        plain = set(embed_shapes()) - {f"{h}.weight" for h in _HEADS}
        if keys != plain | heads:
            raise ValueError(f"Embed.safetensors: missing {sorted(plain | heads - keys)[:5]}, "
                             f"unexpected {sorted(keys - plain - heads)[:5]}")
        for name in plain:
            out[name] = f.get_tensor(name).float()
        for h in _HEADS:
            out[f"{h}.weight"] = fold_weight_norm(
                f.get_tensor(f"{h}.parametrizations.weight.original0"),
                f.get_tensor(f"{h}.parametrizations.weight.original1"))

    shapes = {f"model.{k}": v for k, v in want.items()} | embed_shapes()
    missing = set(shapes) - set(out)
    bad = [k for k, v in out.items() if tuple(v.shape) != shapes[k]]
    if missing or bad:
        raise ValueError(f"checkpoint does not match its config: missing {sorted(missing)[:5]}, "
                         f"wrong shapes {bad[:5]}")
    return out


def convert(asset_dir: str | Path, out_dir: str | Path, *, speaker_stats: str | Path | None = None,
            progress: bool = False) -> Path:
    """Official `asset/` folder -> a folder that vLLM loads (see the module docstring)."""
    asset, out = Path(asset_dir), Path(out_dir)
    missing = [name for name in ASSET_FILES if not (asset / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{asset} is not a ChatTTS asset folder: missing {', '.join(missing)}")
    if out.resolve() == asset.resolve():
        raise ValueError("convert needs an output folder different from the asset folder")
    stats = _load_speaker_stats(asset, speaker_stats)  # fail before writing anything
    gpt_cfg = json.loads((asset / "gpt" / "config.json").read_text())

    bar = tqdm(total=4, desc="convert", unit="step", disable=not progress)
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    _save(_converted_weights(asset, gpt_cfg), out / "model.safetensors")
    bar.update()

    tok_dir = asset / "tokenizer"
    if not all((tok_dir / n).is_file() for n in TOKENIZER_FILES):
        tok_dir = packaged_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, out / name)
    bar.update()

    for name in AUDIO_FILES:
        shutil.copyfile(asset / name, out / AUDIO_DIR / name)
    _save(stats.state_dict(), out / SPEAKER_STATS_FILE)
    bar.update()

    (out / "generation_config.json").unlink(missing_ok=True)
    _json_dump(converted_config(gpt_cfg), out / "config.json")  # last: marks a complete folder
    bar.update()
    bar.close()
    return out


def download(dest: str | Path, *, repo_id: str = "2Noise/ChatTTS", revision: str | None = None,
             speaker_stats: str | Path | None = None, cache_dir: str | Path | None = None,
             progress: bool = True) -> Path:
    """Fetch the official `asset/` files from the Hugging Face Hub, then `convert` into `dest`."""
    from chattts_vllm.checkpoint_download import fetch_asset

    asset = fetch_asset(repo_id, revision=revision, cache_dir=cache_dir, progress=progress)
    return convert(asset, dest, speaker_stats=speaker_stats, progress=progress)
