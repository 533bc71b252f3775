"""Random official-layout assets, the converter and the hub download (model reference section 17).

Full-size checks reuse the session fixtures `asset_dir` / `model_dir` of tests/conftest.py (written
once per session); everything else uses a 2-layer asset written once for this module.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chattts_vllm.checkpoint import convert, fold_weight_norm, write_random_asset
from chattts_vllm.checkpoint_download import DownloadError, fetch_asset

SHARED_TOKENIZER = Path("/work/shared/data/chattts-tokenizer")
TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
OFFICIAL_SIZES = {"Decoder.safetensors": 103_694_920, "DVAE.safetensors": 60_359_112,
                  "Vocos.safetensors": 54_348_240,
                  "Embed.safetensors": 145_598_536}  # Embed: the reference's no-metadata estimate
OFFICIAL_GPT_CONFIG_SHA256 = "0aaa1ecd96c49ad4f473459eb1982fa7ad79fa5de08cde2781bf6ad1f9a0c236"
TENSOR_COUNTS = {"gpt/model.safetensors": 182, "Embed.safetensors": 15, "Decoder.safetensors": 115,
                 "DVAE.safetensors": 242, "Vocos.safetensors": 83}
HEADS = ["head_text"] + [f"head_code.{k}" for k in range(4)]


def official_gpt_shapes(n_layers: int) -> dict[str, tuple]:
    """Section 17's table for gpt/model.safetensors, written out independently of the code."""
    shapes = {"embed_tokens.weight": (32000, 768), "norm.weight": (768,)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for k in "qkvo":
            shapes[f"{p}self_attn.{k}_proj.weight"] = (768, 768)
        shapes.update({f"{p}mlp.gate_proj.weight": (3072, 768), f"{p}mlp.up_proj.weight": (3072, 768),
                       f"{p}mlp.down_proj.weight": (768, 3072), f"{p}input_layernorm.weight": (768,),
                       f"{p}post_attention_layernorm.weight": (768,)})
    return shapes


def official_embed_shapes() -> dict[str, tuple]:
    shapes = {"emb_text.weight": (21178, 768),
              "head_text.parametrizations.weight.original0": (21178, 1),
              "head_text.parametrizations.weight.original1": (21178, 768)}
    for k in range(4):
        shapes[f"emb_code.{k}.weight"] = (626, 768)
        shapes[f"head_code.{k}.parametrizations.weight.original0"] = (626, 1)
        shapes[f"head_code.{k}.parametrizations.weight.original1"] = (626, 768)
    return shapes


def converted_shapes(n_layers: int) -> dict[str, tuple]:
    shapes = {f"model.{k}": v for k, v in official_gpt_shapes(n_layers).items()
              if k != "embed_tokens.weight"}
    for k, v in official_embed_shapes().items():
        if ".parametrizations." not in k:
            shapes[k] = v
    shapes["head_text.weight"] = (21178, 768)
    for k in range(4):
        shapes[f"head_code.{k}.weight"] = (626, 768)
    return shapes


def header(path: Path) -> tuple[dict[str, tuple], set[str], dict | None]:
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        return shapes, dtypes, f.metadata()


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_asset(tmp_path_factory) -> Path:
    return write_random_asset(tmp_path_factory.mktemp("asset2") / "asset", num_layers=2, seed=3)


@pytest.fixture(scope="module")
def small_model(small_asset, tmp_path_factory) -> Path:
    return convert(small_asset, tmp_path_factory.mktemp("model2"))


def _view(asset: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """A cheap copy of an asset folder: symlinks to its files, minus `skip`."""
    for name in files(asset):
        if name not in skip:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).symlink_to(asset / name)
    return dest


# -- the random asset -------------------------------------------------------------------------

def test_full_size_asset_matches_the_official_layout(asset_dir):
    asset = Path(asset_dir)
    assert files(asset) == {"gpt/config.json", "gpt/model.safetensors", "Embed.safetensors",
                            "Decoder.safetensors", "DVAE.safetensors", "Vocos.safetensors",
                            "spk_stat.pt", *(f"tokenizer/{n}" for n in TOKENIZER_FILES)}
    assert sha256(asset / "gpt" / "config.json") == OFFICIAL_GPT_CONFIG_SHA256
    for name, count in TENSOR_COUNTS.items():
        shapes, dtypes, metadata = header(asset / name)
        assert len(shapes) == count, name
        assert dtypes == {"F32"} and metadata is None, name
    for name, size in OFFICIAL_SIZES.items():
        assert (asset / name).stat().st_size == size, name
    assert header(asset / "gpt/model.safetensors")[0] == official_gpt_shapes(20)
    assert header(asset / "Embed.safetensors")[0] == official_embed_shapes()
    for name in TOKENIZER_FILES:
        assert (asset / "tokenizer" / name).read_bytes() == (SHARED_TOKENIZER / name).read_bytes()


def test_audio_files_have_the_official_keys(asset_dir):
    dec, _, _ = header(Path(asset_dir) / "Decoder.safetensors")
    assert dec["coef"] == (1, 100, 1) and dec["decoder.conv_in.0.weight"] == (128, 384, 3)
    assert dec["decoder.decoder_block.11.pwconv1.weight"] == (2048, 512)
    assert dec["out_conv.weight"] == (100, 384, 3)
    dvae, _, _ = header(Path(asset_dir) / "DVAE.safetensors")
    assert dvae["vq_layer.quantizer.rvqs.1.project_in.weight"] == (4, 512)
    assert dvae["encoder.conv_out.weight"] == (1024, 256, 1)
    assert dvae["preprocessor_mel.mel_spec.mel_scale.fb"] == (513, 100)
    voc, _, _ = header(Path(asset_dir) / "Vocos.safetensors")
    assert voc["head.out.weight"] == (1026, 512) and voc["backbone.convnext.7.gamma"] == (512,)


def test_speaker_statistics_are_realistic(small_asset):
    t = torch.load(small_asset / "spk_stat.pt", weights_only=True)
    assert t.dtype == torch.float16 and t.shape == (1536,)
    std, mean = t.float().chunk(2)
    assert (std > 0).all() and abs(std.mean().item() - 3.75) < 0.05
    assert abs(mean.mean().item() - 0.017) < 0.01 and 1.0 < mean.std().item() < 2.5


def test_small_asset_config_and_determinism(small_asset, tmp_path):
    cfg = json.loads((small_asset / "gpt" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"] == ["LlamaModel"]
    assert cfg["vocab_size"] == 32000 and cfg["num_vq"] == 4
    assert header(small_asset / "gpt/model.safetensors")[0] == official_gpt_shapes(2)
    again = write_random_asset(tmp_path / "again", num_layers=2, seed=3)
    for name in ("gpt/model.safetensors", "Embed.safetensors", "spk_stat.pt", "Vocos.safetensors"):
        assert sha256(again / name) == sha256(small_asset / name), name


def test_upstream_loads_the_random_asset_strictly(small_asset):
    from ChatTTS.model.embed import Embed
    from transformers import LlamaModel

    embed = Embed(768, 626, 21178, 4)
    embed.load_state_dict(load_file(str(small_asset / "Embed.safetensors")), strict=True)
    model, info = LlamaModel.from_pretrained(str(small_asset / "gpt"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert len(model.layers) == 2 and model.config.rms_norm_eps == 1e-6


def test_random_heads_give_spread_logits(small_model):
    w = load_file(str(small_model / "model.safetensors"))
    h = torch.randn(64, 768, generator=torch.Generator().manual_seed(0))
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt()       # what the final RMSNorm hands the heads
    for k in range(4):
        logits = h @ w[f"head_code.{k}.weight"].T
        assert 0.5 < logits.std(-1).mean().item() < 2.0
        assert (logits.topk(2).values.diff(dim=-1).abs() > 0).all()  # no ties at the top


# -- conversion -------------------------------------------------------------------------------

def test_full_size_conversion(asset_dir, model_dir):
    asset, model = Path(asset_dir), Path(model_dir)
    assert files(model) == {"config.json", "model.safetensors", *TOKENIZER_FILES,
                            "chattts/Decoder.safetensors", "chattts/DVAE.safetensors",
                            "chattts/Vocos.safetensors", "chattts/speaker_stats.safetensors"}
    shapes, dtypes, _ = header(model / "model.safetensors")
    assert shapes == converted_shapes(20) and dtypes == {"F32"}
    for name in ("Decoder.safetensors", "DVAE.safetensors", "Vocos.safetensors"):
        assert sha256(model / "chattts" / name) == sha256(asset / name)
    with safe_open(str(model / "model.safetensors"), framework="pt") as out, \
            safe_open(str(asset / "gpt/model.safetensors"), framework="pt") as gpt:
        for key in ("layers.0.self_attn.q_proj.weight", "layers.19.mlp.down_proj.weight",
                    "layers.7.input_layernorm.weight", "norm.weight"):
            assert torch.equal(out.get_tensor(f"model.{key}"), gpt.get_tensor(key))
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 20


def test_converted_config(small_model):
    cfg = json.loads((small_model / "config.json").read_text())
    expected = {"architectures": ["ChatTTSForCausalLM"], "model_type": "chattts", "hidden_size": 768,
                "num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 12,
                "intermediate_size": 3072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                "max_position_embeddings": 4096, "vocab_size": 21178, "num_vq": 4,
                "num_audio_tokens": 626, "num_text_tokens": 21178, "torch_dtype": "float32",
                "dtype": "float32", "tie_word_embeddings": False, "eos_token_id": None}
    assert {k: cfg.get(k) for k in expected} == expected
    assert not (small_model / "generation_config.json").exists()
    assert [p.name for p in small_model.glob("*.safetensors")] == ["model.safetensors"]

    from transformers import GenerationConfig

    from chattts_vllm.gpt.configuration import ChatTTSConfig

    hf = ChatTTSConfig.from_pretrained(str(small_model))
    assert hf.rope_parameters["rope_theta"] == 10000.0 and hf.head_dim == 64
    assert hf.vocab_size == 21178 and hf.num_audio_tokens == 626
    # vLLM makes the model config's eos a stop token when there is no generation_config.json
    assert GenerationConfig.from_model_config(hf).eos_token_id is None


def test_converted_weights(small_asset, small_model):
    from ChatTTS.model.embed import Embed

    out = load_file(str(small_model / "model.safetensors"))
    assert set(out) == set(converted_shapes(2)) and "model.embed_tokens.weight" not in out
    src = load_file(str(small_asset / "Embed.safetensors"))
    embed = Embed(768, 626, 21178, 4)
    embed.load_state_dict(src)
    upstream_heads = [embed.head_text] + list(embed.head_code)
    for name, module in zip(HEADS, upstream_heads):
        g = src[f"{name}.parametrizations.weight.original0"]
        v = src[f"{name}.parametrizations.weight.original1"]
        torch.testing.assert_close(out[f"{name}.weight"], g * v / v.norm(dim=1, keepdim=True),
                                   rtol=1e-6, atol=1e-7)
        assert torch.equal(out[f"{name}.weight"], module.weight.detach())  # bit-equal to upstream
    for k in range(4):
        assert torch.equal(out[f"emb_code.{k}.weight"], src[f"emb_code.{k}.weight"])
    assert torch.equal(out["emb_text.weight"], src["emb_text.weight"])
    gpt = load_file(str(small_asset / "gpt/model.safetensors"))
    for key, t in gpt.items():
        if key != "embed_tokens.weight":
            assert torch.equal(out[f"model.{key}"], t), key


def test_fold_weight_norm_rows():
    v = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    g = torch.tensor([[10.0], [0.5]])
    assert torch.allclose(fold_weight_norm(g, v), torch.tensor([[6.0, 8.0], [0.0, 0.5]]))


def test_converted_speaker_stats(small_asset, small_model):
    from chattts_vllm.text.speaker import SpeakerStats

    stats = load_file(str(small_model / "chattts" / "speaker_stats.safetensors"))
    assert set(stats) == {"std", "mean"}
    assert all(t.dtype == torch.float16 and t.shape == (768,) for t in stats.values())
    legacy = torch.load(small_asset / "spk_stat.pt", weights_only=True)
    assert torch.equal(torch.cat([stats["std"], stats["mean"]]), legacy)
    assert torch.equal(SpeakerStats.load(small_model).mean, legacy[768:])


def test_convert_speaker_stats_sources(small_asset, tmp_path):
    legacy = torch.load(small_asset / "spk_stat.pt", weights_only=True)
    bare = _view(small_asset, tmp_path / "bare", skip=("spk_stat.pt",))
    with pytest.raises(FileNotFoundError, match="--speaker-stats"):
        convert(bare, tmp_path / "out0")
    assert not (tmp_path / "out0" / "config.json").exists()
    torch.save(legacy.view(2, 768), tmp_path / "stats.pt")     # (2, 768) is accepted too
    out = convert(bare, tmp_path / "out1", speaker_stats=tmp_path / "stats.pt")
    stats = load_file(str(out / "chattts" / "speaker_stats.safetensors"))
    assert torch.equal(stats["std"], legacy[:768])
    torch.save(torch.zeros(100), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="1536"):
        convert(bare, tmp_path / "out2", speaker_stats=tmp_path / "bad.pt")


def test_convert_rejects_wrong_assets(small_asset, tmp_path):
    with pytest.raises(FileNotFoundError, match="Embed.safetensors"):
        convert(_view(small_asset, tmp_path / "a", skip=("Embed.safetensors",)), tmp_path / "o")
    b = _view(small_asset, tmp_path / "b", skip=("gpt/model.safetensors",))
    gpt = load_file(str(small_asset / "gpt/model.safetensors"))
    save_file({**gpt, "lm_head.weight": torch.zeros(2, 768)}, str(b / "gpt/model.safetensors"))
    with pytest.raises(ValueError, match="lm_head"):
        convert(b, tmp_path / "o")
    c = _view(small_asset, tmp_path / "c", skip=("gpt/config.json",))
    cfg = json.loads((small_asset / "gpt/config.json").read_text())
    (c / "gpt/config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        convert(c, tmp_path / "o")


# -- download ---------------------------------------------------------------------------------

def test_download_fails_fast_and_clearly_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    t0 = time.monotonic()
    # `.invalid` never resolves (RFC 2606): the same failure as this machine's missing network.
    with pytest.raises(DownloadError, match="could not download 2Noise/ChatTTS") as info:
        fetch_asset(endpoint="http://hub.invalid", cache_dir=tmp_path / "cache", progress=False)
    assert time.monotonic() - t0 < 30
    assert "chattts-vllm convert" in str(info.value)
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
