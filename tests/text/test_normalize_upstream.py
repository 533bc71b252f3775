"""Parity with upstream's `ChatTTS.norm.Normalizer` (PyPI chattts==0.2.5) where we promise it.

With text normalization off, our output must equal upstream's for every input (simplifier,
homophones, deletion of unsayable characters). With it on, text that has nothing to spell out
(no digits, no symbols) must still come out as upstream's.
"""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest

from chattts_vllm.text import sayable
from chattts_vllm.text.normalize import EmptyTextError, Normalizer

ChatTTS = pytest.importorskip("ChatTTS")
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*reflected list")  # upstream's numba
UPSTREAM_MAP = Path(ChatTTS.__file__).parent / "res" / "homophones_map.json"

HANDPICKED = [
    "你好，世界。",
    "Hello, world. How are you?",
    "我们今天去公园！然后（可能）去吃饭：火锅；烧烤。",
    "【重要】《三体》「科幻」『小说』－作者：刘慈欣",
    "He said: (yes); she said - no! <ok> [uv_break] done.",
    "价格是35.5元，电话13812345678",          # digits are deleted when normalization is off
    "It costs $3.50 on 2026-11-25 & more @ 50%",
    "[oral_2][laugh]今天天气真好[uv_break]我们出去玩吧[lbreak]",
    "[speed_5]It is a nice day[uv_break]let's go out[laugh_0]",
    "混合 mixed 文本 text，with 标点 punctuation.",
    "喔，嗯，啊，哦，咱们，俺们，嘞，咯，呗",   # homophone-map characters
    "tab\tand\nnewline\r\nhere",
    "emoji 😀 and é accents, ＡＢＣ full-width, ４２",
    "引号“你好”和‘世界’…… 省略号——破折号",
    "a  b   c    多个   空格",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
]


def _alphabet() -> list[str]:
    homophones = list(json.loads(UPSTREAM_MAP.read_text(encoding="utf-8")))
    rng = random.Random(1)
    return (rng.sample(homophones, 400) + list("你好世界中文测试的了是") + list("abcXYZ ") +
            list("，。、,. ：；！（）【】『』「」《》－:;!()><-?？\"'#$%&*+/=@\\^_`{|}~0123456789") +
            list("\n\t…—“”😀é"))


def _random_texts(n: int, seed: int, alphabet: list[str]) -> list[str]:
    rng = random.Random(seed)
    tags = ["[uv_break]", "[laugh]", "[speed_5]", "[oral_2]", "[break_3]", "[Stts]"]
    return ["".join(rng.choice(tags) if rng.random() < 0.04 else rng.choice(alphabet)
                    for _ in range(rng.randint(1, 48))) for _ in range(n)]


@pytest.fixture(scope="module")
def upstream():
    logging.getLogger("ChatTTS.norm").setLevel(logging.ERROR)
    return ChatTTS.norm.Normalizer(str(UPSTREAM_MAP), logger=logging.getLogger("ChatTTS.norm"))


@pytest.fixture(scope="module")
def ours() -> Normalizer:
    return Normalizer()


def _sayable(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fffA-Za-z]", sayable.TAG.sub("", text)))


def test_homophone_map_is_upstream_copy():
    shipped = json.loads(sayable.HOMOPHONES_PATH.read_text(encoding="utf-8"))
    assert shipped == json.loads(UPSTREAM_MAP.read_text(encoding="utf-8"))
    assert len(shipped) == 16425


def test_character_tables_match_upstream(upstream):
    assert str.maketrans(sayable.SIMPLIFY) == upstream.character_simplifier
    assert sayable.ZH_FULLWIDTH == upstream.halfwidth_2_fullwidth


@pytest.mark.parametrize("homophones", [True, False])
def test_filter_equals_upstream(upstream, ours, homophones):
    texts = HANDPICKED + _random_texts(300, seed=int(homophones), alphabet=_alphabet())
    for text in texts:
        want = upstream(text, False, homophones)
        if not _sayable(want):
            with pytest.raises(EmptyTextError):
                ours(text, do_text_normalization=False, do_homophone_replacement=homophones)
            continue
        got = ours(text, do_text_normalization=False, do_homophone_replacement=homophones)
        assert got == want, text


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_nothing_to_spell_equals_upstream(upstream, ours, lang):
    """No digits or symbols: normalization adds nothing to upstream's steps (zh: full-width)."""
    alphabet = (list("你好世界中文测试的了是喔嗯咱们") + list("abcdefXYZ") + list("，。、,.：；！（）《》:;!()") +
                [" "])
    checked = 0
    for text in HANDPICKED[:5] + _random_texts(300, seed=7, alphabet=alphabet):
        want = upstream(text, True, True, lang)
        # We also collapse and strip spaces; compare only where that is a no-op.
        if not _sayable(want) or re.search(r"\s\s|^\s|\s$| [,.，。、]", want) or "?" in text:
            continue
        assert ours(text, lang=lang) == want, text
        checked += 1
    assert checked > 100
