"""Sentence splitting for long inputs, with a length cap so every piece fits one GPT pass.

Upstream (ChatTTS/core.py `Chat.infer`) splits a string on `\\n` if it has one, else after `。` or
after `. `. Here, in addition: pieces are stripped and empty ones dropped in both cases (upstream
keeps the empty lines of a `\\n` split), `. ` after a title (`Mr. `, `Dr. `, `e.g. `) is no
sentence end, and a piece longer than `max_chars` is cut again at the strongest boundary it has:
sentence marks, then clause marks, then spaces, then a character boundary that splits neither a
control tag nor a run of letters or digits. The caller's text is never modified.
"""
from __future__ import annotations

import re

# Upstream infer-code stops at 2,048 frames (43.7 s); ChatTTS reads about 4 CJK characters (or
# about 15 Latin characters) a second, so 120 characters leave room for pauses and slow voices.
DEFAULT_MAX_CHARS = 120

_TITLES = ("Mr", "Mrs", "Ms", "Dr", "Prof", "St", "vs", "No", "e.g", "i.e")
_UPSTREAM = re.compile(r"(?<=。)|(?<=\.\s)" + "".join(rf"(?<!\b{re.escape(t)}\.\s)" for t in _TITLES))
# Cut points, strongest first; each splits *after* its mark so punctuation stays with its clause.
_LEVELS = [
    re.compile(r"(?<=[。！？!?；;…])|(?<=\.\s)"),
    re.compile(r"(?<=[，、,：:])|(?<=\s[-–—]\s)"),
    re.compile(r"(?<=\s)"),
]
_TAG = re.compile(r"\[[A-Za-z][A-Za-z0-9_]*\]")
_WORD = re.compile(r"[A-Za-z0-9]")


def split_like_upstream(text: str) -> list[str]:
    """Upstream's sentence split (plus stripping, empty removal and the title rule)."""
    pieces = text.split("\n") if "\n" in text else _UPSTREAM.split(text)
    return [p for p in (q.strip() for q in pieces) if p]


def _hard_cut(s: str, max_chars: int) -> list[str]:
    """Cut a piece without any usable mark near `max_chars`, never inside a tag or a word."""
    out = []
    while len(s) > max_chars:
        inside = {i for m in _TAG.finditer(s, 0, max_chars + 32) for i in range(m.start() + 1, m.end())}
        cut = next((i for i in range(max_chars, max_chars // 2, -1)
                    if i not in inside and not (_WORD.match(s, i - 1) and _WORD.match(s, i))),
                   None)
        if cut is None:                          # one huge word: cut it anyway, but not in a tag
            cut = next((i for i in range(max_chars, 0, -1) if i not in inside), None) or \
                next(m.end() for m in _TAG.finditer(s) if m.start() < max_chars < m.end())
        out.append(s[:cut])
        s = s[cut:]
    return out + [s]


def _cap(s: str, max_chars: int, level: int = 0) -> list[str]:
    if len(s) <= max_chars:
        return [s]
    if level == len(_LEVELS):
        return _hard_cut(s, max_chars)
    units = [u for u in _LEVELS[level].split(s) if u]
    if len(units) == 1:
        return _cap(s, max_chars, level + 1)
    out, cur = [], ""
    for u in units:                              # greedy packing keeps pieces near max_chars
        if len(cur) + len(u) <= max_chars:
            cur += u
            continue
        if cur:
            out.append(cur)
        if len(u) > max_chars:
            out += _cap(u, max_chars, level + 1)
            cur = ""
        else:
            cur = u
    if cur:
        out.append(cur)
    return out


def cap_length(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Cut one piece into stripped, non-empty pieces of at most `max_chars` characters."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    return [p for p in (q.strip() for q in _cap(text, max_chars)) if p]


def split_sentences(text: str, max_chars: int | None = DEFAULT_MAX_CHARS) -> list[str]:
    """Split like upstream, then cap each piece at `max_chars` (None: no cap)."""
    pieces = split_like_upstream(text)
    if max_chars is None:
        return pieces
    return [q for p in pieces for q in cap_length(p, max_chars)]
