"""OpenAI's `speed` and `instructions` -> ChatTTS prompt tokens.

speed: ChatTTS has ten speed tokens, `[speed_0]` (slowest) ... `[speed_9]`, and uses `[speed_5]`
by default. OpenAI's range 0.25..4 is mapped log-linearly on each side of 1.0, so halving and
doubling are symmetric steps and both ends reach the last token (N = round(5 + 5·log4 s) below
1.0, round(5 + 4·log4 s) above, halves rounded up):

    token   0     1     2     3     4     5     6     7     8     9
    speed   0.25  0.29  0.38  0.5   0.66  0.87  1.19  1.68  2.38  3.36   (lower bounds, rounded)

instructions: the refine-text pass takes `[oral_N]` (0-9, filler words), `[laugh_N]` (0-2) and
`[break_N]` (0-7, pauses). Explicit tokens in the instructions are used as given; otherwise the words
"oral"/"casual"/"conversational", "laugh"/"laughing"/"laughter" and "break"/"pause"/"pauses" turn
on that control at a fixed level (oral 5, laugh 2, break 6), and "no <word>" / "without <word>" sets
it to 0. Anything else in the instructions is ignored. With no control found, `refine_prompt`
returns None and the refine pass is skipped.
"""
from __future__ import annotations

import math
import re

_CONTROLS = {"oral": 9, "laugh": 2, "break": 7}              # kind -> highest level
_WORDS = {
    "oral": ("oral", "casual", "casually", "conversational", "chatty", "filler", "fillers"),
    "laugh": ("laugh", "laughs", "laughing", "laughter"),
    "break": ("break", "breaks", "pause", "pauses", "pausing"),
}
_WORD_LEVEL = {"oral": 5, "laugh": 2, "break": 6}
_TOKEN = re.compile(r"\[(oral|laugh|break)_(\d+)\]", re.I)
_PHRASE = re.compile(r"\b(?:(no|without|not)\s+)?([a-z]+)\b", re.I)


class InvalidInstructionsError(ValueError):
    """A control token out of range, such as `[laugh_5]`."""


def speed_level(speed: float) -> int:
    """OpenAI speed (0.25..4.0) -> N of `[speed_N]`; 1.0 -> 5."""
    if not 0.25 <= speed <= 4.0:
        raise ValueError(f"speed must be in [0.25, 4.0], got {speed}")
    x = math.log(speed) / math.log(4.0)                     # -1 .. 1
    return math.floor(5 + (5 if x < 0 else 4) * x + 0.5)


def speed_prompt(speed: float) -> str:
    return f"[speed_{speed_level(speed)}]"


def _levels(instructions: str) -> dict[str, int]:
    levels: dict[str, int] = {}
    for m in _TOKEN.finditer(instructions):
        kind, n = m.group(1).lower(), int(m.group(2))
        if n > _CONTROLS[kind]:
            raise InvalidInstructionsError(f"[{kind}_{n}] is out of range: {kind} goes from 0 "
                                           f"to {_CONTROLS[kind]}")
        levels[kind] = n
    words = _TOKEN.sub(" ", instructions)
    for m in _PHRASE.finditer(words):
        word = m.group(2).lower()
        for kind, names in _WORDS.items():
            if word in names and kind not in levels:
                levels[kind] = 0 if m.group(1) else _WORD_LEVEL[kind]
    return levels


def refine_prompt(instructions: str | None) -> str | None:
    """The refine-pass prompt (e.g. `[oral_2][laugh_0][break_6]`), or None to skip the pass."""
    if not instructions:
        return None
    levels = _levels(instructions)
    if not levels:
        return None
    return "".join(f"[{kind}_{levels[kind]}]" for kind in _CONTROLS if kind in levels)
