"""Speaker strings, prompt-audio strings, seeded/named voices: parity with upstream ChatTTS."""
import lzma

import numpy as np
import pybase16384 as b14
import pytest
import torch

from chattts_vllm.text.speaker import (
    VOICES, InvalidSpeakerError, SpeakerStats, UnknownVoiceError, decode_prompt_codes,
    decode_speaker, encode_prompt_codes, encode_speaker, normalize_speaker, random_speaker,
    resolve_voice)

Speaker = pytest.importorskip("ChatTTS.model.speaker").Speaker


def _stats(seed: int = 0) -> SpeakerStats:
    g = torch.Generator().manual_seed(seed)
    std = (3.0 * torch.exp(0.6 * torch.randn(768, generator=g))).half()
    mean = (1.6 * torch.randn(768, generator=g)).half()
    return SpeakerStats(std, mean)


def _upstream(stats: SpeakerStats) -> "Speaker":
    raw = torch.cat([stats.std, stats.mean]).numpy().astype("<f2").tobytes()
    return Speaker(768, b14.encode_to_string(raw))


@pytest.fixture(scope="module")
def stats() -> SpeakerStats:
    return _stats()


def test_speaker_string_round_trips_with_upstream(stats):
    up = _upstream(stats)
    for seed in (0, 1, 2222):
        torch.manual_seed(seed)
        theirs = up.sample_random()                      # upstream string
        torch.manual_seed(seed)
        vec = up._sample_random()
        assert torch.equal(decode_speaker(theirs), vec)  # theirs -> ours
        ours = encode_speaker(vec)
        assert ours == theirs                            # identical bytes
        assert torch.equal(torch.from_numpy(Speaker._decode(ours)), vec)  # ours -> theirs
        assert torch.equal(random_speaker(seed, stats), vec)  # seeded voice = upstream's sample


def test_speaker_string_accepts_fp32_and_round_trips():
    v = torch.randn(768) * 4
    s = encode_speaker(v)
    assert torch.equal(decode_speaker(s), v.half())
    assert decode_speaker(s).dtype == torch.float16


def _pack(raw: bytes) -> str:
    flt = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    return b14.encode_to_string(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=flt))


@pytest.mark.parametrize("bad, match", [
    ("", "empty"),
    ("hello", "base16384"),
    ("㴆", "base16384|too short"),
    (b14.encode_to_string(b"not an lzma stream at all" * 4), "LZMA"),
    (_pack(np.zeros(767, "<f2").tobytes()), "1534 bytes"),
    (_pack(np.zeros(2000, "<f2").tobytes()), "bytes"),
    (_pack(np.full(768, np.inf, "<f2").tobytes()), "non-finite"),
    (_pack(np.full(768, np.nan, "<f2").tobytes()), "non-finite"),
])
def test_malformed_speaker_strings(bad, match):
    with pytest.raises(InvalidSpeakerError, match=match):
        decode_speaker(bad)


def test_encode_rejects_wrong_size():
    with pytest.raises(InvalidSpeakerError):
        encode_speaker(torch.zeros(192))


def test_prompt_codes_round_trip_with_upstream():
    g = torch.Generator().manual_seed(3)
    for t in (1, 47, 300):
        codes = torch.randint(0, 625, (4, t), generator=g, dtype=torch.int32)
        theirs = Speaker.encode_prompt(codes)
        assert encode_prompt_codes(codes) == theirs
        ours = decode_prompt_codes(theirs)
        assert ours.dtype == torch.int32 and torch.equal(ours, codes)
        assert torch.equal(Speaker.decode_prompt(encode_prompt_codes(codes.long())), codes)


def test_malformed_prompt_strings():
    good = encode_prompt_codes(torch.zeros(4, 5, dtype=torch.int32))
    for bad in ("", "abc", good[:3], b14.encode_to_string(b"\x04\x00\x05\x00garbage!")):
        with pytest.raises(InvalidSpeakerError):
            decode_prompt_codes(bad)
    wrong_rows = Speaker.encode_prompt(torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(InvalidSpeakerError, match="shape|header"):
        decode_prompt_codes(wrong_rows)
    out_of_range = Speaker.encode_prompt(torch.full((4, 5), 700, dtype=torch.int32))
    with pytest.raises(InvalidSpeakerError, match="626"):
        decode_prompt_codes(out_of_range)
    with pytest.raises(InvalidSpeakerError):
        encode_prompt_codes(torch.zeros(2, 5, dtype=torch.int32))


def test_normalize_speaker_equals_upstream_injection(stats):
    up = _upstream(stats)
    torch.manual_seed(7)
    s = up.sample_random()
    ids = torch.tensor([[21131, 21143, 21173, 872]]).unsqueeze(-1).expand(-1, -1, 4)
    emb = torch.randn(1, 4, 768)
    out = up.apply(emb.clone(), s, ids, 21143, torch.device("cpu"))
    n = normalize_speaker(decode_speaker(s))
    assert n.dtype == torch.float32 and n.shape == (768,)
    assert torch.equal(out[0, 1], n)
    assert torch.equal(out[0, 0], emb[0, 0])
    assert abs(n.norm().item() - 1) < 1e-3


def test_speaker_stats_from_tensor_and_files(tmp_path, stats):
    flat = torch.cat([stats.std, stats.mean])
    for t in (flat, flat.view(2, 768), flat.float()):
        s = SpeakerStats.from_tensor(t)
        assert s.std.dtype == torch.float16 and torch.equal(s.std, stats.std)
        assert torch.equal(s.mean, stats.mean)
    with pytest.raises(ValueError):
        SpeakerStats.from_tensor(torch.zeros(768))
    torch.save(flat, tmp_path / "spk_stat.pt")
    assert torch.equal(SpeakerStats.load(tmp_path).mean, stats.mean)
    from safetensors.torch import save_file
    (tmp_path / "model" / "chattts").mkdir(parents=True)
    save_file(stats.state_dict(), str(tmp_path / "model" / "chattts" / "speaker_stats.safetensors"))
    assert torch.equal(SpeakerStats.load(tmp_path / "model").std, stats.std)
    assert torch.equal(SpeakerStats.load(tmp_path / "model" / "chattts").std, stats.std)
    with pytest.raises(FileNotFoundError):
        SpeakerStats.load(tmp_path / "nowhere")
    torch.save({"std": stats.std, "mean": stats.mean}, tmp_path / "dict.pt")
    assert torch.equal(SpeakerStats.load(tmp_path / "dict.pt").std, stats.std)
    torch.save({"something": flat}, tmp_path / "wrong.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(torch.full((1536,), float("nan")), tmp_path / "nan.pt")
    for bad in ("wrong.pt", "list.pt", "nan.pt"):
        with pytest.raises(ValueError):
            SpeakerStats.load(tmp_path / bad)


def test_resolve_voice(stats):
    assert set(VOICES) >= {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova",
                           "sage", "shimmer", "verse", "marin", "cedar", "default"}
    assert len(set(VOICES.values())) == len(VOICES)
    assert resolve_voice(None, stats) is None
    alloy = resolve_voice("alloy", stats)
    assert alloy.dtype == torch.float16 and alloy.shape == (768,)
    assert torch.equal(alloy, random_speaker(VOICES["alloy"], stats))
    assert torch.equal(resolve_voice(" Alloy ", stats), alloy)
    assert torch.equal(resolve_voice({"id": "alloy"}, stats), alloy)
    assert torch.equal(resolve_voice("seed:42", stats), random_speaker(42, stats))
    assert not torch.equal(resolve_voice("echo", stats), alloy)
    s = encode_speaker(alloy)
    assert torch.equal(resolve_voice(s, None), alloy)
    assert torch.equal(resolve_voice({"id": s}, None), alloy)
    for bad in ("alloyy", "seed:x", {"voice": "alloy"}, 3):
        with pytest.raises(UnknownVoiceError):
            resolve_voice(bad, stats)
    with pytest.raises(InvalidSpeakerError):
        resolve_voice(s[:-20], stats)
    with pytest.raises(ValueError, match="statistics"):
        resolve_voice("alloy", None)
