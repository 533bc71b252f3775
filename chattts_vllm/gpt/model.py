"""ChatTTSForCausalLM: vLLM's Llama backbone with ChatTTS's embeddings and five heads.

Input embedding rule (one implementation, `embed_tokens`, used by every runner):
  text position          -> emb_text[id]            (emb_text is the backbone's embed_tokens)
  audio position         -> sum_k emb_code[k][code_k] (prompt-audio frames and generated frames)
  [spk_emb] position     -> the unit-norm speaker vector
vLLM hands the model only token ids and positions, so the per-token codes and speaker rows come
from the runner glue (`frame_inputs`), which knows each request's frame history.

Logits layout (`compute_logits`): a text row holds head_text's 21,178 logits; a code row holds the
four code heads' 4 x 626 logits in its first 2,504 columns and -inf after them (an all-code batch on
model runner V2 returns just those 2,504 columns). Samplers read them back with `split_code_logits`.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from chattts_vllm.config import NUM_AUDIO_TOKENS, NUM_VQ

CODE_LOGITS_WIDTH = NUM_VQ * NUM_AUDIO_TOKENS


@dataclass
class TokenInputs:
    """Per-token extras for one forward, dense so that no runner needs a host sync to build them.

    codes [N, 4] int: the frame's codes on audio tokens, -1 on text tokens;
    speaker_mask [N] bool and speaker_vectors [N, hidden]: rows that take the speaker vector.
    """

    codes: torch.Tensor
    speaker_mask: torch.Tensor
    speaker_vectors: torch.Tensor


@dataclass
class LogitsLayout:
    """Which logits rows are code rows: "text" (none), "code" (all), or "mixed" with a row mask.

    `narrow` lets an all-code batch return only the 2,504 code columns (model runner V2's own
    sampler reads them); the V1 sampler needs the full engine vocabulary width.
    """

    kind: str
    code_rows: torch.Tensor | None = None
    narrow: bool = False


class FrameInputs(Protocol):
    """What a runner glue provides to the model (see chattts_vllm/runners)."""

    def token_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> TokenInputs | None: ...

    def logits_layout(self, num_rows: int) -> LogitsLayout: ...


def split_code_logits(logits: torch.Tensor) -> torch.Tensor:
    """[R, >=2504] engine logits of code rows -> [R, 4, 626]."""
    return logits[:, :CODE_LOGITS_WIDTH].reshape(-1, NUM_VQ, NUM_AUDIO_TOKENS)


_LIVE_MODELS: dict[str, weakref.ref] = {}


def live_model(instance_id: str) -> "ChatTTSForCausalLM | None":
    """The ChatTTS model of the engine whose VllmConfig has this `instance_id`.

    Runner glue that vLLM builds separately (the V1 logits processor) finds its model here; keyed
    by engine because several in-process engines can live in one Python process.
    """
    ref = _LIVE_MODELS.get(instance_id)
    return ref() if ref is not None else None


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
        self._code_weight: torch.Tensor | None = None   # see _code_head_weight
        _LIVE_MODELS[vllm_config.instance_id] = weakref.ref(self)

    # -- embedding ---------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def embed_tokens(self, input_ids: torch.Tensor, extras: TokenInputs | None) -> torch.Tensor:
        """The ChatTTS input embedding of N tokens (see the module docstring); sync-free."""
        emb = self.model.embed_input_ids(input_ids)
        if extras is None:
            return emb
        codes = extras.codes
        safe = codes.clamp(min=0)
        code_emb = self.emb_code[0](safe[:, 0])
        for k in range(1, len(self.emb_code)):
            code_emb = code_emb + self.emb_code[k](safe[:, k])
        emb = torch.where((codes[:, 0] >= 0).unsqueeze(1), code_emb.to(emb.dtype), emb)
        return torch.where(extras.speaker_mask.unsqueeze(1), extras.speaker_vectors.to(emb.dtype), emb)

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
        """[N, hidden] -> [N, 4, 626] fp32: the four heads as one GEMM (one launch, not five)."""
        logits = F.linear(hidden_states, self._code_head_weight())
        return logits.view(-1, len(self.head_code), self.config.num_audio_tokens).float()

    def _code_head_weight(self) -> torch.Tensor:
        """The four head_code weights as one [4 * 626, hidden] tensor.

        The heads' parameters are re-pointed at row blocks of it, so in-place updates (weight
        loading, tests) reach it for free; a head whose storage moved (a replaced or moved
        parameter) is detected by its address and the tensor is rebuilt.
        """
        cat = self._code_weight
        heads = [h.weight for h in self.head_code]
        if cat is not None and cat.dtype == heads[0].dtype and cat.device == heads[0].device:
            step = heads[0].numel() * cat.element_size()
            if all(w.data_ptr() == cat.data_ptr() + k * step for k, w in enumerate(heads)):
                return cat
        with torch.no_grad():
            cat = torch.cat([w.detach() for w in heads], dim=0)
            rows = heads[0].shape[0]
            for k, w in enumerate(heads):
                w.data = cat[k * rows:(k + 1) * rows]
        self._code_weight = cat
        return cat

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.last_hidden_states = hidden_states
        layout = self.frame_inputs.logits_layout(hidden_states.shape[0]) if self.frame_inputs else None
        if layout is None or layout.kind == "text":
            return self.text_logits(hidden_states)
        code = self.code_logits(hidden_states).flatten(1)
        if layout.kind == "code" and layout.narrow:
            return code
        n, vocab = hidden_states.shape[0], self.config.vocab_size
        if layout.kind == "code":
            logits = torch.full((n, vocab), float("-inf"), dtype=torch.float32, device=code.device)
            logits[:, :CODE_LOGITS_WIDTH] = code
            return logits
        # Mixed batch: a dense select, no host sync.
        is_code = layout.code_rows.to(code.device).unsqueeze(1)
        logits = self.text_logits(hidden_states)
        logits[:, :CODE_LOGITS_WIDTH] = torch.where(is_code, code, logits[:, :CODE_LOGITS_WIDTH])
        logits[:, CODE_LOGITS_WIDTH:].masked_fill_(is_code, float("-inf"))
        return logits

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
        self._code_head_weight()  # fuse the code heads now rather than in the first step
        return loaded

    @staticmethod
    def get_model_state_cls():
        """Model runner V2 hook (the GPU fast path); imported lazily so CPU never loads it."""
        from chattts_vllm.runners.mrv2 import ChatTTSModelState

        return ChatTTSModelState
