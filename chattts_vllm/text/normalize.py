"""Text front end: the one entry point that turns user text into text ChatTTS can say.

`Normalizer` replaces upstream's `ChatTTS/norm.py` for both the offline API and the speech endpoint:

1. text normalization (`do_text_normalization`): numbers, dates, money, units and symbols are
   spelled out (`numbers_zh`, `numbers_en`) outside control tags; zh text then gets upstream's
   half-width → full-width punctuation;
2. upstream's character steps (`sayable`): simplifier map, homophone map
   (`do_homophone_replacement`), deletion of what the tokenizer cannot say.

With normalization off the output equals upstream's `Normalizer` (tests/text compare them). With it
on, this differs from upstream on purpose: upstream registers no normalizer (digits are deleted);
language detection ignores control tags; when `lang` is None each sentence picks its own number
language by upstream's rule, so "35元" inside an English paragraph is still read in Chinese;
whitespace runs become one space and `?` becomes a full stop instead of vanishing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from chattts_vllm.text import numbers_zh
from chattts_vllm.text.numbers_en import normalize_en
from chattts_vllm.text.numbers_zh import normalize_zh
from chattts_vllm.text.sayable import HOMOPHONES_PATH, SPEAKABLE, TAG, ZH_FULLWIDTH, CharFilter
from chattts_vllm.text.split import DEFAULT_MAX_CHARS, cap_length, split_like_upstream, split_sentences

__all__ = ["EmptyTextError", "Normalizer", "detect_language", "split_sentences", "DEFAULT_MAX_CHARS"]

Lang = Literal["zh", "en"]

_CJK_CHAR = re.compile(r"[\u4e00-\u9fff]")
_EN_WORD = re.compile(r"\b[A-Za-z]+\b")
# Sentence ends where the number language may switch; never inside "3.5" or a tag.
_SENTENCE = re.compile(r"(?<=[。！？!?；;\n])|(?<=\.\s)")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_MARK = re.compile(r" +(?=[,.，。、])")
_TN = {"zh": normalize_zh, "en": normalize_en}


class EmptyTextError(ValueError):
    """The text holds nothing ChatTTS can say (empty, only symbols, or only control tags)."""


def _guess(text: str) -> Lang | None:
    cjk = len(_CJK_CHAR.findall(text))
    words = len(_EN_WORD.findall(text))
    if not cjk and not words:
        return None
    return "zh" if cjk > words else "en"


def detect_language(text: str) -> Lang:
    """Upstream's rule: zh if CJK characters outnumber English words; tags are not words here."""
    return _guess(TAG.sub(" ", text)) or "en"


def _sayable(text: str) -> bool:
    return bool(SPEAKABLE.search(TAG.sub("", text)))


class Normalizer:
    """Callable text normalizer; build once (it loads the 16,425-entry homophone map and, unless
    `eager` is False, the zh grammar, so the first request does not pay ~0.5 s for it)."""

    def __init__(self, homophones_path: str | Path = HOMOPHONES_PATH, *, eager: bool = True):
        self._chars = CharFilter(homophones_path)
        if eager:
            numbers_zh.load()

    def __call__(
        self,
        text: str,
        *,
        lang: Lang | None = None,
        do_text_normalization: bool = True,
        do_homophone_replacement: bool = True,
    ) -> str:
        if lang not in (None, "zh", "en"):
            raise ValueError(f"lang must be 'zh', 'en' or None, got {lang!r}")
        out = text
        if do_text_normalization:
            doc_lang = lang or detect_language(text)
            out = self._spell_out(out, lang, doc_lang)
            if doc_lang == "zh":
                out = out.translate(ZH_FULLWIDTH)
        out = self._chars(out, do_homophone_replacement)
        if do_text_normalization:
            out = _SPACE_BEFORE_MARK.sub("", _SPACES.sub(" ", out)).strip()
        if not _sayable(out):
            raise EmptyTextError(f"nothing sayable in text {text[:80]!r}")
        return out

    def _spell_out(self, text: str, lang: Lang | None, doc_lang: Lang) -> str:
        """Run the number/symbol normalizer on the text between control tags."""
        parts = TAG.split(text)
        for i in range(0, len(parts), 2):
            if lang is not None:
                parts[i] = _TN[lang](_SPACES.sub(" ", parts[i]))
                continue
            sentences = _SENTENCE.split(parts[i])
            parts[i] = "".join(_TN[_guess(s) or doc_lang](_SPACES.sub(" ", s)) for s in sentences)
        return "".join(parts)

    def split(
        self,
        text: str,
        max_chars: int = DEFAULT_MAX_CHARS,
        *,
        lang: Lang | None = None,
        do_text_normalization: bool = True,
        do_homophone_replacement: bool = True,
    ) -> list[str]:
        """Split like upstream, normalize each piece, then cap each at `max_chars`.

        Pieces with nothing sayable are dropped; `EmptyTextError` only if none is left. The cap
        applies after normalization, since "2026" becomes "twenty twenty six".
        """
        out: list[str] = []
        pending = ""                                 # tags of a piece with nothing to say
        for piece in split_like_upstream(text):
            try:
                said = self(piece, lang=lang, do_text_normalization=do_text_normalization,
                            do_homophone_replacement=do_homophone_replacement)
            except EmptyTextError:
                pending += "".join(TAG.findall(piece))
                continue
            for capped in cap_length(pending + said, max_chars):
                pending = ""
                if out and not _sayable(capped):     # a lone tag or mark joins its neighbour
                    out[-1] += capped
                else:
                    out.append(capped)
        if out and pending:
            out[-1] += pending
        if out and not _sayable(out[0]) and len(out) > 1:
            out[1] = out.pop(0) + out[1]
        if not out:
            raise EmptyTextError(f"nothing sayable in text {text[:80]!r}")
        return out
