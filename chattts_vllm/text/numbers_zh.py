"""Chinese text normalization: digits and symbols → Chinese words.

Numbers go through WeTextProcessing's Chinese TN grammar, the normalizer upstream's examples register
for zh, run by the `wetext` package on kaldifst (no pynini build). The grammar costs ~0.3 ms per
call plus ~50 µs per character, growing faster than linearly (3.7k chars: ~0.7 s), so:

- plain numbers (integers, decimals, percentages, grouped digits, clock times) are read by `_fast`
  with `cn2an`; tests/text check that it agrees with the grammar on random numbers and contexts;
- every other digit run goes to the grammar as a short window: the run plus a few CJK characters
  each side (enough for 第, 下午, 千克, 摄氏度); long runs of Latin text are cut into tokens;
- text without digits never reaches the grammar, and what it leaves (symbols, a stray digit) is
  spelled by the small rules at the end, so no digit survives.
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache

logger = logging.getLogger(__name__)

_CJK = re.compile(r"[\u4e00-\u9fff]")
_DIGIT = re.compile(r"\d")
# Runs of characters that are neither CJK ideographs, CJK/full-width punctuation nor newlines.
_RUN = re.compile(r"[^\u4e00-\u9fff\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\n]+")
_TOKEN = re.compile(r"\S*\d\S*")             # a digit-holding token of a long run
_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*%?")  # a number inside a long token
_MAX_CORE = 24                                # longer runs are cut: the grammar is superlinear
_MAX_WINDOW = 32
_LEFT_CONTEXT = 3                             # "下午3点", "第3", "公元"
_RIGHT_CONTEXT = 4                            # "3平方公里", "30摄氏度"

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
# Separators are required: optional ones would let the regex backtrack exponentially.
_PHONE = re.compile(r"(?<![0-9A-Za-z+])(?:\+\d{1,3}(?:[ -]\d{2,11})+|\d{3,4}(?: \d{3,4}){2,})(?!\d)")

_ZH_DIGITS = "零一二三四五六七八九"
_PHONE_DIGITS = str.maketrans({str(i): d for i, d in enumerate("零幺二三四五六七八九")})
_PLAIN = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%?)")
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")
_MOBILE = re.compile(r"1[3-9]\d{9}")
_SERVICE_NUMBERS = {"110", "111", "112", "114", "119", "120", "122"}  # the grammar reads digits

# Symbols the grammar leaves alone (no digits around them), spelled as a Chinese reader would.
_SYMBOLS = {"&": "和", "+": "加", "=": "等于", "@": "艾特", "×": "乘", "÷": "除以", "%": "百分号",
            "°": "度", "℃": "摄氏度", "?": "。", "？": "。", "…": "。"}
_SYMBOL_RE = re.compile("[" + re.escape("".join(_SYMBOLS)) + "]")


@lru_cache(maxsize=1)
def _grammar():
    """Load the zh TN grammar once (wetext reads all of its FSTs on import: ~0.3 s, ~40 MB)."""
    from wetext import Normalizer
    return Normalizer(lang="zh", operator="tn")


@lru_cache(maxsize=1)
def _an2cn():
    from cn2an import an2cn
    return an2cn


def _read_digits(s: str) -> str:
    return "".join(_ZH_DIGITS[int(c)] for c in s)


def _cardinal(whole: str) -> str:
    # The grammar says 两 for a leading 2 of 百/千/万/亿 ("两百", "两千万") and 二 elsewhere.
    words = _an2cn()(whole)
    return "两" + words[1:] if words[:1] == "二" and words[1:2] in ("百", "千", "万", "亿") else words


def _clock(m: re.Match) -> str:
    """"8:05" → 八点零五分, "2:30" → 两点三十分, "23:59:59" → 二十三点五十九分五十九秒."""
    h, mi, sec = int(m[1]), m[2], m[3]
    out = ("两" if h == 2 else _cardinal(str(h))) + "点"
    if mi != "00" or sec and sec != "00":
        out += ("零" if mi[0] == "0" else "") + _cardinal(str(int(mi))) + "分"
    if sec and sec != "00":
        out += _cardinal(str(int(sec))) + "秒"
    return out


def _fast(run: str, before: str, after: str) -> str | None:
    """Read a plain number as the grammar would, ~50× faster; None hands it to the grammar.

    Covers integers, decimals, percentages and digit-grouped numbers between CJK characters or
    punctuation (tests/text check these shapes against the grammar on random numbers and
    contexts), and clock times and 第N, where the grammar has quirks ("0:30" → 零比三十, 第两季度).
    Left to the grammar: 2 before a CJK character (两 or 二 depends on the measure word), N年
    unless 4 digits, 5 digits before punctuation (read as a code), service numbers (110, 120 ...),
    MM.DD dates (10.1 → 十月一日), > 9 digits, anything with a symbol or a letter.
    """
    if _MOBILE.fullmatch(run) or len(run) > 12 and run.isdigit():
        return run.translate(_PHONE_DIGITS)            # phones, ids: 幺三八..., as the grammar
    m = _CLOCK.fullmatch(run)
    if m:
        return _clock(m)
    m = _PLAIN.fullmatch(run)
    if m is None:
        return None
    whole, frac, pct = m.groups()
    grouped = "," in whole
    whole = whole.replace(",", "")
    if before == "第" and whole.isdigit() and not (frac or pct) and len(whole) <= 9:
        return _an2cn()(whole)                         # ordinals never say 两: 第二季度, 第二百
    if len(whole) > 1 and whole[0] == "0" and not (frac or pct or grouped):
        return _read_digits(whole)                     # "007", "08分": codes and clock digits
    if len(whole) > 9 or len(whole) > 1 and whole[0] == "0":
        return None
    if not (frac or pct or grouped):
        if whole in _SERVICE_NUMBERS:
            return None
        if not _CJK.match(after):                      # before punctuation: 5 digits are a code
            if len(whole) == 5:
                return None
        elif whole == "2":
            return None
        elif after == "年":
            return _read_digits(whole) if len(whole) == 4 else None
    if frac and not pct and 10 <= int(whole) <= 12 and len(frac) <= 3 and not _CJK.match(after):
        return None
    words = _cardinal(whole) + ("点" + _read_digits(frac[1:]) if frac else "")
    return "百分之" + words if pct else words


def _cores(text: str):
    """Digit-holding spans of at most `_MAX_CORE` characters: whole runs, else their tokens, else
    the numbers in those tokens (longer numbers are left to the digit-by-digit fallback)."""
    for run in _RUN.finditer(text):
        if not _DIGIT.search(run.group()):
            continue
        if len(run.group().strip()) <= _MAX_CORE:
            yield run.span()
            continue
        for tok in _TOKEN.finditer(text, *run.span()):
            a, b = tok.start(), len(tok.group().rstrip(".,;:!?")) + tok.start()
            if b - a <= _MAX_CORE:
                yield a, b                             # "2001." → "2001": plain, fast
                continue
            for num in _NUMBER.finditer(text, *tok.span()):
                if num.end() - num.start() <= _MAX_CORE:
                    yield num.span()


def _spans(text: str) -> list[tuple[int, int, str | None]]:
    """Replacements: (start, end, words) read by `_fast`, (start, end, None) for the grammar.

    A grammar window is a digit-holding span plus CJK context, merged with a window it touches
    while the merged window stays within `_MAX_WINDOW` characters.
    """
    spans: list[tuple[int, int, str | None]] = []
    for a, b in _cores(text):
        run = text[a:b]
        core = run.strip()
        words = _fast(core, text[a - 1:a] if a else "", text[b:b + 1])
        if words is not None:
            lead, tail = run[: len(run) - len(run.lstrip())], run[len(run.rstrip()):]
            spans.append((a, b, lead + words + tail))
            continue
        for _ in range(_LEFT_CONTEXT):
            if a > 0 and _CJK.match(text, a - 1):
                a -= 1
        for _ in range(_RIGHT_CONTEXT):
            if b < len(text) and _CJK.match(text, b):
                b += 1
        if spans and spans[-1][2] is None and a <= spans[-1][1] and b - spans[-1][0] <= _MAX_WINDOW:
            spans[-1] = (spans[-1][0], b, None)
        else:
            spans.append((max(a, spans[-1][1]) if spans else a, b, None))
    return spans


def load() -> None:
    """Load the grammar and cn2an now rather than on the first Chinese number (~0.5 s)."""
    _grammar()
    _an2cn()


@lru_cache(maxsize=4096)                          # "第1章", "2个": windows recur in real text
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


def _phone(m: re.Match) -> str:
    s = m.group()
    body = " ".join(re.findall(r"\d+", s)).translate(_PHONE_DIGITS)
    return ("加" if s.startswith("+") else "") + body


def normalize_zh(text: str) -> str:
    """Spell out every number and sayable symbol of a Chinese text; digits never survive."""
    text = text.translate(_FOLD)
    if _DIGIT.search(text):
        text = _CJK_DIGIT_SPACE.sub("", text)
        text = _TILDE_RANGE.sub("-", text)
        text = _PHONE.sub(_phone, text)
        pieces, last = [], 0
        for a, b, words in _spans(text):
            pieces += [text[last:a], _verbalize(text[a:b]) if words is None else words]
            last = b
        pieces.append(text[last:])
        text = "".join(pieces)
        text = _DIGIT.sub(lambda m: _ZH_DIGITS[int(m.group())], text)
    return _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group()], text)
