"""Tokenizer and prompts -> token ids, exactly as upstream ChatTTS builds them.

Code pass: `[Stts][spk_emb]{txt_smp}{prompt}{text}[Ptts]` (or `[empty_spk]`), then one position per
prompt-audio frame. Refine pass: `[Sbreak]{text}[Pbreak]{prompt}`. Both are tokenised by the BERT
WordPiece tokenizer without [CLS]/[SEP]; the `tokenizers` library does that directly, without
transformers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from chattts_vllm.config import BREAK_0_ID, NUM_AUDIO_TOKENS, NUM_VQ, SPK_EMB_ID

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# transformers' clean_up_tokenization, which BertTokenizerFast.decode applies after the decoder.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class EmptyTextError(ValueError):
    """The text has nothing to say (empty, whitespace or only speaker tokens)."""


class TextTooLongError(ValueError):
    """The prompt has more tokens than allowed."""


def packaged_tokenizer_dir() -> Path:
    """The official tokenizer files shipped inside this package."""
    return Path(str(resources.files("chattts_vllm") / "data" / "tokenizer"))


def find_tokenizer_dir(path: str | Path | None = None) -> Path:
    """A converted model dir (files at top level), an asset dir (`tokenizer/`), or the files' dir."""
    if path is None:
        return packaged_tokenizer_dir()
    path = Path(path)
    for d in (path, path / "tokenizer", path / "asset" / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return d
    raise FileNotFoundError(f"no tokenizer.json in {path} or its tokenizer/ folder")


class ChatTTSTokenizer:
    """BERT-Chinese WordPiece plus the 50 ChatTTS tokens; never adds [CLS]/[SEP], pads or truncates."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        # tokenizer.json declares truncation and fixed padding at 256; ChatTTS applies neither.
        self._tok.no_truncation()
        self._tok.no_padding()

    @classmethod
    def from_dir(cls, path: str | Path | None = None) -> ChatTTSTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(find_tokenizer_dir(path) / "tokenizer.json")))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Tokens joined by spaces, special tokens kept, as upstream's batch_decode gives them."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        for a, b in _CLEANUP:
            text = text.replace(a, b)
        return text


@dataclass
class CodePrompt:
    """One infer-code prompt: text ids, then one placeholder per prompt-audio frame."""

    token_ids: list[int]
    text_len: int                           # positions embedded as text; the rest are audio frames
    spk_position: int | None                # index of [spk_emb], which receives the speaker vector
    prompt_codes: list[list[int]] | None    # (Tp, 4): the codes of positions text_len..

    def __len__(self) -> int:
        return len(self.token_ids)


def _strip_speaker_tokens(text: str) -> str:
    # Upstream issue #459: users paste these tokens into the text.
    for tag in ("[Stts]", "[spk_emb]", "[empty_spk]"):
        text = text.replace(tag, "")
    return text.strip()


def _check_length(n: int, max_prompt_tokens: int | None) -> None:
    if max_prompt_tokens is not None and n > max_prompt_tokens:
        raise TextTooLongError(f"prompt has {n} tokens, more than the limit of {max_prompt_tokens}")


def _frames(prompt_codes: Any) -> list[list[int]]:
    """(4, Tp) codes -> Tp frames of 4 ints."""
    rows = prompt_codes.tolist() if hasattr(prompt_codes, "tolist") else [list(r) for r in prompt_codes]
    if len(rows) != NUM_VQ or len({len(r) for r in rows}) != 1:
        raise ValueError(f"prompt codes must have shape ({NUM_VQ}, Tp)")
    try:
        frames = [[operator.index(c) for c in f] for f in zip(*rows)]
    except TypeError:
        frames = None
    if frames is None or any(not 0 <= c < NUM_AUDIO_TOKENS for f in frames for c in f):
        raise ValueError(f"prompt codes must be integers in [0, {NUM_AUDIO_TOKENS})")
    return frames


def build_code_prompt(tok: ChatTTSTokenizer, text: str, *, has_speaker: bool, txt_smp: str = "",
                      prompt: str = "[speed_5]", prompt_codes: Any = None,
                      max_prompt_tokens: int | None = None) -> CodePrompt:
    """The infer-code prompt for one text (upstream `decorate_code_prompts` + `Tokenizer.encode`)."""
    text = _strip_speaker_tokens(text)
    if not text or not tok.encode(text):
        raise EmptyTextError("text is empty")
    spk = "[spk_emb]" if has_speaker else "[empty_spk]"
    ids = tok.encode(f"[Stts]{spk}{txt_smp or ''}{prompt or ''}{text}[Ptts]")
    text_len = len(ids)
    frames = _frames(prompt_codes) if prompt_codes is not None else None
    if frames:
        ids += [f[0] for f in frames]  # placeholder ids; these positions embed their 4 codes
    _check_length(len(ids), max_prompt_tokens)
    spk_position = ids.index(SPK_EMB_ID) if has_speaker else None
    return CodePrompt(ids, text_len, spk_position, frames or None)


def build_refine_prompt(tok: ChatTTSTokenizer, text: str, prompt: str = "",
                        max_prompt_tokens: int | None = None) -> list[int]:
    """The refine-text prompt (upstream `decorate_text_prompts`): `[Sbreak]{text}[Pbreak]{prompt}`."""
    if not text.strip() or not tok.encode(text):
        raise EmptyTextError("text is empty")
    ids = tok.encode(f"[Sbreak]{text}[Pbreak]{prompt}")
    _check_length(len(ids), max_prompt_tokens)
    return ids


def refine_ids_to_text(tok: ChatTTSTokenizer, ids: list[int]) -> str:
    """Refine output -> code-pass text: drop [break_N], [laugh_N], [oral_N], [speed_N], decode."""
    return tok.decode([i for i in ids if i < BREAK_0_ID])
