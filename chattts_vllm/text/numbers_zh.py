"""Chinese text normalization: digits and symbols → Chinese words.

The numbers go through WeTextProcessing's Chinese TN grammar, the normalizer upstream's examples
register for zh, run by the `wetext` package on kaldifst (no pynini build). Its cost grows faster than
linearly with input length (3.7k chars: ~0.7 s), so only short windows around each digit run are
sent: the non-CJK run holding the digits plus a few CJK characters of context each side (enough
for 第, 下午, 千克, 摄氏度, 年月日). Text without digits never reaches the grammar. What the grammar
leaves (symbols, a digit it could not place) is spelled by small rules here, so no digit survives.
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache

logger = logging.getLogger(__name__)

_CJK = re.compile(r"[\u4e00-\u9fff]")
_DIGIT = re.compile(r"\d")
# A run of characters that are neither CJK ideographs nor CJK/full-width punctuation nor newlines.
_RUN = re.compile(r"[^\u4e00-\u9fff\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\n]+")
_LEFT_CONTEXT = 3       # "下午3点", "第3", "公元"
_RIGHT_CONTEXT = 4      # "3平方公里", "30摄氏度"

# Full-width digits, letters and the few signs the grammar knows, folded to ASCII first.
_FOLD = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)},
                       **{chr(0xFF21 + i): chr(0x41 + i) for i in range(26)},
                       **{chr(0xFF41 + i): chr(0x61 + i) for i in range(26)},
                       "％": "%", "＋": "+", "＝": "=", "＄": "$"})

# Spaces between CJK and digits ("在 2026 年") would split one date into three tokens.
_CJK_DIGIT_SPACE = re.compile(r"(?<=[\u4e00-\u9fff])\s+(?=\d)|(?<=\d)\s+(?=[\u4e00-\u9fff])")
# "15～20℃": the grammar reads "15-20" as a range but leaves the tilde.
_TILDE_RANGE = re.compile(r"(?<=\d)\s*[~～]\s*(?=\d)")
# International or space-grouped phone numbers: the grammar would read "+86 138" as counts.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}(?:[ -]?\d{2,5}){2,}|\d{3,4}(?: \d{3,4}){2,})(?!\d)")
_ZH_DIGITS = "零一二三四五六七八九"
_PHONE_DIGITS = str.maketrans({str(i): d for i, d in enumerate("零幺二三四五六七八九")})

# Symbols the grammar leaves alone (no digits around them), spelled as a Chinese reader would.
_SYMBOLS = {"&": "和", "+": "加", "=": "等于", "@": "艾特", "×": "乘", "÷": "除以", "%": "百分号",
            "°": "度", "℃": "摄氏度", "?": "。", "？": "。", "…": "。"}
_SYMBOL_RE = re.compile("[" + re.escape("".join(_SYMBOLS)) + "]")


@lru_cache(maxsize=1)
def _grammar():
    """Load the zh TN grammar once (wetext reads all of its FSTs on import: ~0.3 s, ~40 MB)."""
    from wetext import Normalizer
    return Normalizer(lang="zh", operator="tn")


def _phone(m: re.Match) -> str:
    s = m.group()
    body = " ".join(re.findall(r"\d+", s)).translate(_PHONE_DIGITS)
    return ("加" if s.startswith("+") else "") + body


def _spell_digits(m: re.Match) -> str:
    return "".join(_ZH_DIGITS[int(c)] for c in m.group())


def _windows(text: str) -> list[tuple[int, int]]:
    """Spans to send to the grammar: digit-holding runs plus CJK context, merged when they touch."""
    spans: list[tuple[int, int]] = []
    for run in _RUN.finditer(text):
        if not _DIGIT.search(run.group()):
            continue
        a, b = run.span()
        for _ in range(_LEFT_CONTEXT):
            if a > 0 and _CJK.match(text, a - 1):
                a -= 1
        for _ in range(_RIGHT_CONTEXT):
            if b < len(text) and _CJK.match(text, b):
                b += 1
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def _verbalize(window: str) -> str:
    body = window.strip()
    try:
        out = _grammar().normalize(body)
    except Exception as e:  # the grammar asserts on a few odd inputs; the digit rule covers them
        logger.debug("zh TN grammar failed on %r: %s", body, e)
        out = body
    lead = window[: len(window) - len(window.lstrip())]
    tail = window[len(window.rstrip()):]
    return lead + out + tail


def normalize_zh(text: str) -> str:
    """Spell out every number and sayable symbol of a Chinese text; digits never survive."""
    text = text.translate(_FOLD)
    if _DIGIT.search(text):
        text = _CJK_DIGIT_SPACE.sub("", text)
        text = _TILDE_RANGE.sub("-", text)
        text = _PHONE.sub(_phone, text)
        pieces, last = [], 0
        for a, b in _windows(text):
            pieces += [text[last:a], _verbalize(text[a:b])]
            last = b
        pieces.append(text[last:])
        text = "".join(pieces)
        text = re.sub(r"\d+", _spell_digits, text)
    return _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group()], text)
