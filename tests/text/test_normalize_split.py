"""Sentence splitting: upstream's rule, plus a length cap that never breaks a tag or a word."""
from __future__ import annotations

import re

import pytest

from chattts_vllm.text.normalize import EmptyTextError, Normalizer
from chattts_vllm.text.split import DEFAULT_MAX_CHARS, cap_length, split_like_upstream, split_sentences

TAG = re.compile(r"\[[A-Za-z][A-Za-z0-9_]*\]")


def _upstream_split(text: str) -> list[str]:
    # The rule of ChatTTS/core.py Chat.infer (split_text=True), plus strip/drop-empty.
    pieces = text.split("\n") if "\n" in text else re.split(r"(?<=。)|(?<=\.\s)", text)
    return [p.strip() for p in pieces if p.strip()]


@pytest.mark.parametrize("text", [
    "你好。我很好。你呢？",
    "Hello there. How are you? Fine. Thanks.",
    "第一行\n第二行。还是第二行\n\n第三行\n",
    "没有标点的一句话",
    "Pi is 3.14. E is 2.72.",
    "混合 mixed。Text here. 中文。",
    "",
])
def test_matches_upstream_rule(text):
    assert split_like_upstream(text) == _upstream_split(text)
    assert split_sentences(text, max_chars=None) == _upstream_split(text)


def test_titles_are_not_sentence_ends():
    assert split_like_upstream("Hello Mr. Smith. Dr. Who is here.") == ["Hello Mr. Smith.",
                                                                       "Dr. Who is here."]


def test_caller_text_untouched():
    text = "一。二。三。"
    split_sentences(text, max_chars=2)
    assert text == "一。二。三。"


def test_cap_prefers_strong_marks():
    text = "我们今天，去公园玩了很久，然后回家。吃饭了，非常开心，睡觉了。"
    assert cap_length(text, 20) == ["我们今天，去公园玩了很久，然后回家。", "吃饭了，非常开心，睡觉了。"]
    assert cap_length(text, 12) == ["我们今天，", "去公园玩了很久，", "然后回家。", "吃饭了，非常开心，", "睡觉了。"]


@pytest.mark.parametrize("text, max_chars", [
    ("今天天气很好" * 60, 50),                     # CJK without punctuation: char boundaries
    ("word " * 100, 37),                          # Latin without punctuation: spaces
    ("supercalifragilistic " * 20 + "x" * 90, 40),  # one word longer than the cap
    ("很长很长[uv_break]" * 30 + "hello[laugh]world" * 5, 23),
    ("It costs a lot, really a lot; more than you think: " * 8, 45),
])
def test_cap_bounds_and_keeps_everything(text, max_chars):
    pieces = split_sentences(text, max_chars=max_chars)
    assert all(0 < len(p) <= max_chars for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "").replace("\n", "")
    # a tag is never cut
    assert sum(len(TAG.findall(p)) for p in pieces) == len(TAG.findall(text))
    # Latin words are not cut unless longer than the cap
    words = set(re.findall(r"[A-Za-z]+", text))
    for p in pieces:
        for w in re.findall(r"[A-Za-z]+", p):
            assert w in words or len(max(words, key=len)) > max_chars


def test_default_cap():
    pieces = split_sentences("这是一个很长的句子" * 100)
    assert max(map(len, pieces)) <= DEFAULT_MAX_CHARS and len(pieces) > 1


def test_bad_cap():
    with pytest.raises(ValueError):
        cap_length("abc", 0)


def test_normalizer_split():
    norm = Normalizer()
    pieces = norm.split("第一句有3个苹果。第二句很长" + "很长" * 80 + "。\n\n[laugh]\nThird: 2026!", 60)
    assert pieces[0] == "第一句有三个苹果。"
    assert all(len(p) <= 60 for p in pieces)
    assert pieces[-1] == "[laugh]Third, twenty twenty six."   # a lone tag joins the next piece
    assert norm.split("你好。\n[laugh]") == ["你好。[laugh]"]   # ... or the last one
    assert not any(re.search(r"[0-9]", TAG.sub("", p)) for p in pieces)
    with pytest.raises(EmptyTextError):
        norm.split("!!!\n???\n")
