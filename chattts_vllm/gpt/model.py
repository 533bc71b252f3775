"""ChatTTSForCausalLM: vLLM's Llama backbone with ChatTTS's embeddings and five heads.

Input embedding rule (one implementation, `embed_tokens`, used by every runner):
  text position          -> emb_text[id]            (emb_text is the backbone's embed_tokens)
  audio position         -> sum_k emb_code[k][code_k] (prompt-audio frames and generated frames)
  [spk_emb] position     -> the unit-norm speaker vector
vLLM hands the model only token ids and positions, so the per-token codes and speaker rows come
from the runner glue (`frame_inputs`), which knows each request's frame history.

Logits layout (`compute_logits`): a text row holds head_text's 21,178 logits; a code row holds the
four code heads' 4 x 626 logits in its first 2,504 columns and -inf after them. The runner's sampler
reads them back with `split_code_logits`.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from chattts_vllm.config import NUM_AUDIO_TOKENS, NUM_VQ

CODE_LOGITS_WIDTH = NUM_VQ * NUM_AUDIO_TOKENS


@dataclass
class TokenInputs:
    """Per-token extras for one forward: codes [N, 4] (-1 on text tokens) and speaker rows."""

    codes: torch.Tensor
    speaker_index: torch.Tensor      # [M] token indices
    speaker_vectors: torch.Tensor    # [M, hidden]


class FrameInputs(Protocol):
    """What a runner glue provides to the model (see chattts_vllm/runners)."""

    def token_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> TokenInputs | None: ...

    def code_rows(self, num_rows: int) -> torch.Tensor | None: ...


def split_code_logits(logits: torch.Tensor) -> torch.Tensor:
    """[R, >=2504] engine logits of code rows -> [R, 4, 626]."""
    return logits[:, :CODE_LOGITS_WIDTH].reshape(-1, NUM_VQ, NUM_AUDIO_TOKENS)


_LIVE_MODELS: list[weakref.ref] = []


def live_model() -> "ChatTTSForCausalLM | None":
    """The ChatTTS model loaded in this process, for runner glue that vLLM builds separately."""
    for ref in reversed(_LIVE_MODELS):
        if (m := ref()) is not None:
            return m
    return None


class ChatTTSForCausalLM(nn.Module):
    # The official Embed.safetensors text table is the backbone's token embedding.
    # (LlamaModel.load_weights fuses q/k/v and gate/up itself.)
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"emb_text.": "model.embed_tokens."})
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        hidden = config.hidden_size
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.emb_code = nn.ModuleList(nn.Embedding(config.num_audio_tokens, hidden)
                                      for _ in range(config.num_vq))
        self.head_text = nn.Linear(hidden, config.num_text_tokens, bias=False)
        self.head_code = nn.ModuleList(nn.Linear(hidden, config.num_audio_tokens, bias=False)
                                       for _ in range(config.num_vq))
        self.frame_inputs: FrameInputs | None = None
        self.last_hidden_states: torch.Tensor | None = None
        _LIVE_MODELS.append(weakref.ref(self))

    # -- embedding ---------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def embed_tokens(self, input_ids: torch.Tensor, extras: TokenInputs | None) -> torch.Tensor:
        """The ChatTTS input embedding of N tokens (see the module docstring)."""
        emb = self.model.embed_input_ids(input_ids)
        if extras is None:
            return emb
        codes = extras.codes
        is_audio = codes[:, 0] >= 0
        if bool(is_audio.any()):
            audio_codes = codes[is_audio]
            code_emb = sum(self.emb_code[k](audio_codes[:, k]) for k in range(len(self.emb_code)))
            emb = emb.index_put((is_audio.nonzero().squeeze(1),), code_emb.to(emb.dtype))
        if extras.speaker_index.numel():
            emb = emb.index_put((extras.speaker_index,), extras.speaker_vectors.to(emb.dtype))
        return emb

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        if inputs_embeds is None:
            extras = self.frame_inputs.token_inputs(input_ids, positions) if self.frame_inputs else None
            inputs_embeds = self.embed_tokens(input_ids, extras)
        return self.model(None, positions, intermediate_tensors, inputs_embeds)

    # -- heads -------------------------------------------------------------------------------
    def text_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head_text(hidden_states).float()

    def code_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, 4, 626] fp32, the four heads read the same hidden state."""
        return torch.stack([h(hidden_states) for h in self.head_code], dim=1).float()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.last_hidden_states = hidden_states
        n = hidden_states.shape[0]
        code_rows = self.frame_inputs.code_rows(n) if self.frame_inputs else None
        if code_rows is None or not bool(code_rows.any()):
            return self.text_logits(hidden_states)
        logits = torch.full((n, self.config.vocab_size), float("-inf"),
                            dtype=torch.float32, device=hidden_states.device)
        logits[code_rows, :CODE_LOGITS_WIDTH] = self.code_logits(hidden_states[code_rows]).flatten(1)
        text_rows = ~code_rows
        if bool(text_rows.any()):
            logits[text_rows] = self.text_logits(hidden_states[text_rows])
        return logits

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

