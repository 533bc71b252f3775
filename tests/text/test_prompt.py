"""Prompt token ids vs upstream ChatTTS's Tokenizer.encode + decorate_*_prompts."""
from pathlib import Path

import pytest
import torch

from chattts_vllm.config import SPK_EMB_ID
from chattts_vllm.text.prompt import (
    ChatTTSTokenizer, EmptyTextError, TextTooLongError, build_code_prompt, build_refine_prompt,
    packaged_tokenizer_dir, refine_ids_to_text)

upstream_tokenizer = pytest.importorskip("ChatTTS.model.tokenizer")
Speaker = pytest.importorskip("ChatTTS.model.speaker").Speaker

SHARED = Path("/work/shared/data/chattts-tokenizer")

TEXTS = [
    "你好 hello[uv_break]world",
    "What is [uv_break]your favorite english food?[laugh][lbreak]",
    "四川美食可多了，有麻辣火锅、宫保鸡丁、麻婆豆腐、担担面、回锅肉、夫妻肺片等，每样都是让人垂涎三尺的美味。",
    "  Hello, it's don't I'm we've they're. Shouldn't! Right? OK , fine .  ",
    "[Stts][spk_emb]already decorated[empty_spk] text[Ptts]",
    "Numbers 12345 and symbols #$%^&* and UPPER case MiXeD",
    "混合 mixed 文本 text [laugh] 笑 [uv_break] 停顿 [lbreak]",
    "unaffable antidisestablishmentarianism supercalifragilistic",
    "emoji 😀 and accents café naïve Ünïcödé",
    "[oral_2][laugh_0][break_6][speed_9] control tokens inline",
    "tab\tnew\nline   spaces",
    "a" * 150,
]


@pytest.fixture(scope="module")
def tok() -> ChatTTSTokenizer:
    return ChatTTSTokenizer.from_dir()


@pytest.fixture(scope="module")
def up():
    return upstream_tokenizer.Tokenizer(str(SHARED))


def _up_ids(up, s: str, prompt_codes=None) -> list[int]:
    ids, attn, text_mask = up.encode([s], 4, prompt=prompt_codes)
    assert attn.all()
    return ids[0, :, 0].tolist(), ids[0], text_mask[0]


def test_packaged_tokenizer_is_the_official_one(tok):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (packaged_tokenizer_dir() / name).read_bytes() == (SHARED / name).read_bytes()
    assert len(tok) == 21178
    assert tok.token_to_id("[spk_emb]") == SPK_EMB_ID
    assert tok.token_to_id("[break_0]") == 21147 and tok.token_to_id("[Ebreak]") == 21136


def test_from_dir_layouts(tmp_path):
    import shutil
    (tmp_path / "asset" / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / name, tmp_path / "asset" / "tokenizer" / name)
        shutil.copy(SHARED / name, tmp_path / name)
    for d in (tmp_path, tmp_path / "asset", tmp_path / "asset" / "tokenizer"):
        assert ChatTTSTokenizer.from_dir(d).encode("[Stts]你好") == [21131, 872, 1962]
    with pytest.raises(FileNotFoundError):
        ChatTTSTokenizer.from_dir(tmp_path / "missing")


def test_reference_example(tok):
    s = "[Stts][empty_spk][speed_5]你好 hello[uv_break]world[Ptts]"
    assert tok.encode(s) == [21131, 21144, 21173, 872, 1962, 8701, 21137, 8572, 21132]


def test_no_truncation_or_padding(tok, up):
    s = "你好" * 300
    assert len(tok.encode(s)) == 600 == len(_up_ids(up, s)[0])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("has_speaker", [True, False])
@pytest.mark.parametrize("txt_smp, prompt", [("", "[speed_5]"), ("参考文本 reference", "[speed_2]"),
                                             ("", "")])
def test_code_prompt_matches_upstream(tok, up, text, has_speaker, txt_smp, prompt):
    spk = "x" if has_speaker else None
    s = Speaker.decorate_code_prompts([text], prompt, txt_smp or None, spk)[0]
    expected, _, _ = _up_ids(up, s)
    p = build_code_prompt(tok, text, has_speaker=has_speaker, txt_smp=txt_smp, prompt=prompt)
    assert p.token_ids == expected
    assert p.text_len == len(expected) and p.prompt_codes is None
    assert p.spk_position == (1 if has_speaker else None)
    if has_speaker:
        assert p.token_ids[p.spk_position] == SPK_EMB_ID
    assert tok.decode(p.token_ids) == up.decode([expected])[0]


def test_code_prompt_with_audio_prompt_matches_upstream(tok, up):
    codes = torch.randint(0, 625, (4, 47), generator=torch.Generator().manual_seed(0))
    text = "hello world"
    s = Speaker.decorate_code_prompts([text], "[speed_5]", "sample transcript", "x")[0]
    _, ids4, text_mask = _up_ids(up, s, prompt_codes=codes)
    p = build_code_prompt(tok, text, has_speaker=True, txt_smp="sample transcript",
                          prompt_codes=codes)
    n = int(text_mask.sum())
    assert p.text_len == n and len(p) == ids4.shape[0] == n + 47
    assert p.token_ids[:n] == ids4[:n, 0].tolist()
    assert p.prompt_codes == ids4[n:].tolist() == codes.t().tolist()
    assert p.token_ids[n:] == codes[0].tolist()
    assert not text_mask[n:].any()
    # nested lists work too; bad shapes or codes are rejected
    assert build_code_prompt(tok, text, has_speaker=True, prompt_codes=codes.tolist()).prompt_codes \
        == p.prompt_codes
    with pytest.raises(ValueError):
        build_code_prompt(tok, text, has_speaker=True, prompt_codes=codes[:3])
    with pytest.raises(ValueError):
        build_code_prompt(tok, text, has_speaker=True, prompt_codes=codes + 700)


def test_ci_example(tok, up):
    # upstream tests/#655.py: the decorated, encoded prompt decodes to this string
    text = "What is [uv_break]your favorite english food?[laugh][lbreak]"
    p = build_code_prompt(tok, text, has_speaker=True)
    want = ("[Stts] [spk_emb] [speed_5] what is [uv_break] your favorite english food? [laugh] "
            "[lbreak] [Ptts]")
    assert tok.decode(p.token_ids) == want
    assert up.decode([p.token_ids])[0] == want


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "[oral_2][laugh_0][break_6]"])
def test_refine_prompt_matches_upstream(tok, up, text, prompt):
    s = Speaker.decorate_text_prompts([text], prompt)[0]
    assert build_refine_prompt(tok, text, prompt) == _up_ids(up, s)[0]


def test_refine_ids_to_text(tok, up):
    ids = tok.encode("你好[oral_2][uv_break]hello[break_3] world[laugh][laugh_1][speed_5]"
                     "[lbreak] don't . ok ?")
    t = torch.tensor(ids)
    expected = up.decode([t[t.less(21147)]])[0]  # what upstream's _refine_text does
    assert refine_ids_to_text(tok, ids) == expected
    assert expected == "你 好 [uv_break] hello world [laugh] [lbreak] don't. ok?"


def test_decode_matches_upstream_on_many_ids(tok, up):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, 21178, (30,), generator=g).tolist()
        assert tok.decode(ids) == up.decode([ids])[0]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == up.decode([ids])[0]
        assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_errors(tok):
    for bad in ("", "   ", "[spk_emb]", " [Stts][empty_spk] ", "\u200b"):
        with pytest.raises(EmptyTextError):
            build_code_prompt(tok, bad, has_speaker=True)
    with pytest.raises(EmptyTextError):
        build_refine_prompt(tok, "  ")
    p = build_code_prompt(tok, "hello world", has_speaker=False)
    assert build_code_prompt(tok, "hello world", has_speaker=False,
                             max_prompt_tokens=len(p)).token_ids == p.token_ids
    with pytest.raises(TextTooLongError):
        build_code_prompt(tok, "hello world", has_speaker=False, max_prompt_tokens=len(p) - 1)
    codes = torch.zeros(4, 10, dtype=torch.int64)
    with pytest.raises(TextTooLongError):
        build_code_prompt(tok, "hello world", has_speaker=False, prompt_codes=codes,
                          max_prompt_tokens=len(p) + 9)
    with pytest.raises(TextTooLongError):
        build_refine_prompt(tok, "你好" * 100, max_prompt_tokens=100)
