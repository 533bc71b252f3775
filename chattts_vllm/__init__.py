"""chattts-vllm: the ChatTTS text-to-speech model as a vLLM plugin.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it once in every process (front
end, engine core, workers, the registry probe), so it is idempotent and registers the model lazily
by name: importing the plugin never imports torch kernels or touches a GPU.
"""
from __future__ import annotations

ARCHITECTURE = "ChatTTSForCausalLM"
MODEL_CLASS = "chattts_vllm.gpt.model:ChatTTSForCausalLM"


def register() -> None:
    import os

    if os.environ.get("CHATTTS_VLLM_DUMP_STACKS_AFTER"):
        # Debug aid for hangs: every vLLM process (front end, engine core, workers) prints its
        # Python stacks after this many seconds, and again at the same interval.
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["CHATTTS_VLLM_DUMP_STACKS_AFTER"]), repeat=True)
    if os.environ.get("CHATTTS_VLLM_STACK_SAMPLE"):
        # Where each vLLM process's host time goes while it serves (chattts_vllm/stack_sampler.py).
        from chattts_vllm.stack_sampler import start_from_env

        start_from_env()
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from chattts_vllm.gpt.configuration import ChatTTSConfig

    AutoConfig.register(ChatTTSConfig.model_type, ChatTTSConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    from chattts_vllm.runners.engine_config import register_config_hook

    register_config_hook(ARCHITECTURE)
