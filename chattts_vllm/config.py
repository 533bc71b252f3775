"""ChatTTS constants and the vLLM-facing model config.

Numbers come from the official `2Noise/ChatTTS` checkpoint (see the model reference): a 20-layer,
768-wide Llama with 4 codebooks of 626 codes (code 625 is EOS) and a 21,178-token text vocabulary.
"""
from __future__ import annotations

HIDDEN_SIZE = 768
NUM_VQ = 4                      # codebooks per frame
NUM_AUDIO_TOKENS = 626          # codes per codebook, including EOS
AUDIO_EOS = NUM_AUDIO_TOKENS - 1  # 625: any head drawing it ends the utterance
NUM_TEXT_TOKENS = 21178
SAMPLE_RATE = 24000
FRAMES_PER_SECOND = 46.875      # GPT steps per second of audio
SAMPLES_PER_FRAME = 512

# Special text tokens (ids in the official tokenizer).
PAD_ID = 0
STTS_ID = 21131                 # [Stts]
PTTS_ID = 21132                 # [Ptts]
SBREAK_ID = 21134               # [Sbreak]
PBREAK_ID = 21135               # [Pbreak]
EBREAK_ID = 21136               # [Ebreak]: refine-text EOS
SPK_EMB_ID = 21143              # [spk_emb]: position that receives the speaker vector
EMPTY_SPK_ID = 21144            # [empty_spk]
BREAK_0_ID = 21147              # [break_0]: refine output ids >= this are dropped

REPETITION_WINDOW = 16          # ChatTTS penalises only the last 16 generated codes, per codebook
MIN_TOKENS_TO_KEEP = 3          # top-p and top-k both keep at least 3 candidates

