"""ChatTTS's sayable character set: upstream's last text steps, kept bit-for-bit.

The ChatTTS tokenizer has no digits and few symbols, so upstream (ChatTTS/norm.py) ends every text
with three character-level steps, which this module reproduces (tests compare it with the PyPI
`chattts` package):

1. simplify: full-width and ASCII brackets, colons, dashes ... become `，`/`,` and `！`/`!` become
   `。`/`.`;
2. homophones: a 16,425-entry CJK → CJK map swaps characters the model misreads;
3. reject: outside control tags, every character but CJK U+4E00–U+9FFF, `A-Za-z` and `，。、,. `
   (space included) is deleted.

Zh text first gets half-width → full-width punctuation (`ZH_FULLWIDTH`), so `,.` become `，。`.

Upstream runs steps 1 and 3 only when a rejected character is present; both are no-ops otherwise,
so they run unconditionally here. A control tag is `[identifier]` (`[uv_break]`, `[speed_5]`, the
50 added tokens); upstream treats any `[...]` as a tag when filtering, so text such as `[1]` or
`[a b]` keeps its brackets (and digits) there but not here.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

HOMOPHONES_PATH = Path(__file__).parent / "data" / "homophones_map.json"

# Capturing group: re.split keeps tags at odd indices.
TAG = re.compile(r"(\[[A-Za-z][A-Za-z0-9_]*\])")
REJECT = re.compile(r"[^\u4e00-\u9fffA-Za-z，。、,. ]+")
# What the tokenizer can speak: used to tell an empty result from a real one.
SPEAKABLE = re.compile(r"[\u4e00-\u9fffA-Za-z]")


def _pairs(src: str, dst: str) -> dict[int, str]:
    assert len(src) == len(dst)
    return {ord(a): b for a, b in zip(src, dst)}


# Step 1 (upstream "character simplifier"): pause marks become a comma, exclamations a full stop.
SIMPLIFY = _pairs("：；！（）【】『』「」《》－:;!()><-", "，，。，，，，，，，，，，，,,.,,,,,")
# Zh only, before step 1 (upstream "halfwidth_2_fullwidth"); `[ ] _` stay so tags survive.
ZH_FULLWIDTH = str.maketrans(_pairs(
    "!\"'#$%&(),-*+./:;<=>?@\\^`{|}~",
    "！“‘＃＄％＆（），－＊＋。／：；＜＝＞？＠＼＾｀｛｜｝～",
))


@lru_cache(maxsize=4)
def load_homophones(path: str | Path = HOMOPHONES_PATH) -> dict[int, str]:
    """Read the homophone map as a str.translate table (one char → one char)."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    return {ord(k): v for k, v in table.items()}


def reject_outside_tags(text: str) -> str:
    """Delete unsayable characters, leaving control tags whole (step 3)."""
    if "[" not in text:
        return REJECT.sub("", text)
    parts = TAG.split(text)
    parts[::2] = [REJECT.sub("", p) for p in parts[::2]]
    return "".join(parts)


class CharFilter:
    """Steps 1–3 as two precomputed translate tables and one regex pass."""

    def __init__(self, homophones_path: str | Path = HOMOPHONES_PATH):
        self._simplify = str.maketrans(SIMPLIFY)
        # Simplifier outputs are punctuation and homophone keys are CJK, so one table does both.
        self._simplify_homophones = {**load_homophones(homophones_path), **self._simplify}

    def __call__(self, text: str, homophones: bool = True) -> str:
        text = text.translate(self._simplify_homophones if homophones else self._simplify)
        return reject_outside_tags(text)
