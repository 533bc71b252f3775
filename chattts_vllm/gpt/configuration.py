"""The transformers config class of converted checkpoints (`model_type: "chattts"`).

It is a LlamaConfig, so vLLM's Llama layers read it unchanged; the ChatTTS fields ride along. It must
live at module level: vLLM pickles the config into its engine and worker processes.
"""
from __future__ import annotations

from transformers import LlamaConfig

from chattts_vllm.config import NUM_AUDIO_TOKENS, NUM_TEXT_TOKENS, NUM_VQ


class ChatTTSConfig(LlamaConfig):
    model_type = "chattts"

    def __init__(self, num_vq: int = NUM_VQ, num_audio_tokens: int = NUM_AUDIO_TOKENS,
                 num_text_tokens: int = NUM_TEXT_TOKENS, **kwargs):
        self.num_vq = num_vq
        self.num_audio_tokens = num_audio_tokens
        self.num_text_tokens = num_text_tokens
        # The engine-visible vocabulary is the text vocabulary: the text head's width, and the id
        # space of every token the engine emits (audio frames emit code0 or 625, both below it).
        kwargs.setdefault("vocab_size", num_text_tokens)
        # LlamaConfig defaults to bos 1 / eos 2, which vLLM would turn into stop tokens: a frame
        # whose code0 is 2 would end the utterance. ChatTTS stops through its own sampler only.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(key, None)
        super().__init__(**kwargs)
