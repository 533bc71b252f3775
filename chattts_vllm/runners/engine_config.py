"""Engine settings the ChatTTS model needs, applied by vLLM's per-architecture config hook.

`vllm serve DIR` and `LLM(DIR)` then work with no ChatTTS-specific flags:
- the V1 runner (CPU, or a GPU run forced onto V1 with VLLM_USE_V2_MODEL_RUNNER=0) gets the
  ChatTTS sampler as a custom logits processor. It is named here, not declared as a
  `vllm.logits_processors` entry point, which would push every model onto V1. On the GPU, model
  runner V2 uses the model's own state instead (`get_model_state_cls`, runners/mrv2.py), and a
  logits processor would force V1, so none is added there;
- prefix caching is turned off: the speaker vector and the codes of audio frames are not part of
  the token ids that vLLM hashes, so two requests with the same text but different voices (or
  different audio prompts) would otherwise share KV blocks;
- on model runner V2, CUDA graphs are captured for steps of up to `PREFILL_GRAPH_TOKENS` tokens
  (vLLM's default stops at twice max_num_seqs, at most 512), unless the user set the sizes. A
  burst of new streams is prefilled in steps of a few hundred to ~2,000 tokens (30-60 prompt
  tokens each); without a graph such a step ran eagerly, 19-27 ms of host time on an H200 against
  ~6.5 ms for a step with piecewise graphs (server timeline, 2026-11-29), and every stream
  already running waited for it.
"""
from __future__ import annotations

from vllm.logger import init_logger

logger = init_logger(__name__)

V1_SAMPLER = "chattts_vllm.runners.v1:ChatTTSLogitsProcessor"
PREFILL_GRAPH_TOKENS = 2048     # 64 simultaneous arrivals of ~30 prompt tokens, with room


class ChatTTSEngineConfig:
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        procs = list(model_config.logits_processors or [])
        if uses_v1_runner() and V1_SAMPLER not in procs:
            model_config.logits_processors = procs + [V1_SAMPLER]
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("ChatTTS: prefix caching turned off, since speaker vectors and audio codes "
                        "are not part of the hashed token ids (same text, other voice would share KV)")
            vllm_config.cache_config.enable_prefix_caching = False
        cc = vllm_config.compilation_config
        if not uses_v1_runner() and cc.max_cudagraph_capture_size is None \
                and not cc.cudagraph_capture_sizes:
            # vLLM then caps it at max_num_batched_tokens and captures decode graphs only up to
            # max_num_seqs, so this adds piecewise (prefill) graphs and nothing else.
            cc.max_cudagraph_capture_size = PREFILL_GRAPH_TOKENS


def uses_v1_runner() -> bool:
    """CPU always runs V1; on the GPU only when the user opts out of model runner V2."""
    import os

    from vllm.platforms import current_platform

    return current_platform.is_cpu() or os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0"


def register_config_hook(architecture: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP.setdefault(architecture, ChatTTSEngineConfig)
