"""The serving pieces that need no engine: controls, request parsing, plan seeds, plugin list,
model-folder resolution and the demo checkpoint cache."""
from __future__ import annotations

import json

import pytest

from chattts_vllm.params import InferCodeParams, RefineTextParams
from chattts_vllm.serving.cli import demo_model_dir, plugin_allowlist, resolve_model_dir
from chattts_vllm.serving.controls import InvalidInstructionsError, refine_prompt, speed_level
from chattts_vllm.serving.pipeline import SpeechPlan
from chattts_vllm.serving.protocol import SpeechError, parse_speech_request


@pytest.mark.parametrize("speed,level", [(0.25, 0), (0.3, 1), (0.5, 3), (0.9, 5), (1.0, 5),
                                         (1.1, 5), (1.5, 6), (2.0, 7), (3.0, 8), (4.0, 9)])
def test_speed_maps_onto_ten_tokens(speed, level):
    assert speed_level(speed) == level


def test_speed_is_monotonic_and_bounded():
    levels = [speed_level(0.25 + i * 0.01) for i in range(376)]
    assert levels == sorted(levels) and levels[0] == 0 and levels[-1] == 9
    with pytest.raises(ValueError):
        speed_level(4.01)


@pytest.mark.parametrize("text,prompt", [
    (None, None), ("", None), ("Speak in a cheerful tone.", None),
    ("[oral_2][laugh_0][break_6]", "[oral_2][laugh_0][break_6]"),
    ("Laughing, with long pauses", "[laugh_2][break_6]"),
    ("casual, no laughter", "[oral_5][laugh_0]"),
    ("[break_3] but pause a lot", "[break_3]"),                  # the explicit token wins
])
def test_instructions_map_onto_refine_controls(text, prompt):
    assert refine_prompt(text) == prompt


def test_out_of_range_control_is_an_error():
    with pytest.raises(InvalidInstructionsError):
        refine_prompt("[oral_10]")


def _parse(**fields):
    return parse_speech_request(json.dumps({"model": "m", "input": "hi", **fields}).encode(), ["m"])


def test_request_defaults_follow_openai_and_upstream():
    r = _parse()
    assert (r.response_format, r.speed, r.stream_format, r.voice_spec) == ("mp3", 1.0, None, "default")
    assert (r.temperature, r.top_p, r.top_k, r.seed) == (0.3, 0.7, 20, None)
    assert _parse(voice={"id": "nova"}).voice_spec == {"id": "nova"}


@pytest.mark.parametrize("body,param,code", [
    (b"nope", None, "invalid_json"),
    (b'"a string"', None, "invalid_json"),
    (json.dumps({"input": "hi"}).encode(), "model", "missing_required_parameter"),
    (json.dumps({"model": "other", "input": "hi"}).encode(), "model", "model_not_found"),
    (json.dumps({"model": "m", "input": " "}).encode(), "input", "empty_input"),
    (json.dumps({"model": "m", "input": "x" * 4097}).encode(), "input", "input_too_long"),
    (json.dumps({"model": "m", "input": "hi", "response_format": "aac"}).encode(),
     "response_format", "unsupported_format"),
    (json.dumps({"model": "m", "input": "hi", "speed": 0}).encode(), "speed", "invalid_speed"),
    (json.dumps({"model": "m", "input": "hi", "voice": 3}).encode(), "voice", "invalid_voice"),
])
def test_bad_requests_name_their_field(body, param, code):
    with pytest.raises(SpeechError) as e:
        parse_speech_request(body, ["m"])
    err = e.value.body()["error"]
    assert (err["param"], err["code"], err["type"], e.value.status) == (
        param, code, "invalid_request_error", 400)


def test_plan_gives_each_sentence_its_own_seed_and_one_voice():
    plan = SpeechPlan.build(["a", "b", "c"], InferCodeParams(manual_seed=2**63 - 1), "spk",
                            RefineTextParams(manual_seed=5))
    assert [p.manual_seed for p in plan.params] == [2**63 - 1, 0, 1]
    assert [p.manual_seed for p in plan.refine] == [5, 6, 7]
    assert SpeechPlan.build(["a", "b"], InferCodeParams(), None).params[1].manual_seed is None


def test_plugin_allowlist_keeps_other_plugins():
    assert plugin_allowlist("foo, bar") == "foo,bar,chattts,chattts_speech"
    assert plugin_allowlist("chattts_speech,chattts") == "chattts_speech,chattts"
    names = plugin_allowlist(None).split(",")      # unset: every installed plugin stays on
    assert {"chattts", "chattts_speech"} <= set(names)


def test_model_folders_resolve_and_assets_convert_once(serving_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTTS_VLLM_CACHE", str(tmp_path))
    assert resolve_model_dir(serving_model_dir) == serving_model_dir.resolve()
    asset = serving_model_dir.parent / "asset"
    out = resolve_model_dir(asset)
    assert out.parent == tmp_path / "models" and (out / "chattts" / "Decoder.safetensors").is_file()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(asset.parent) == out                       # the asset's parent works too
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime      # not converted again
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "models")


def test_demo_checkpoint_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTTS_VLLM_CACHE", str(tmp_path))
    d = demo_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and (d / "chattts" / "Vocos.safetensors").is_file()
    assert demo_model_dir() == d and [p.name for p in tmp_path.iterdir()] == [d.name]


def test_whole_file_jobs_ask_the_engine_for_the_final_output_only(tmp_path, monkeypatch):
    """A non-streamed request reads frames only at the end: no per-step outputs (CPU cost). A
    stream asks for deltas (which vLLM's --stream-interval can thin) and joins them."""
    import asyncio

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from chattts_vllm.gpt.requests import EnginePrompt
    from chattts_vllm.serving.streaming import SpeechJob

    monkeypatch.setenv("CHATTTS_VLLM_FRAME_DIR", str(tmp_path))
    seen: list = []

    def out(ids):
        return type("Out", (), {"outputs": [type("C", (), {"token_ids": ids})()]})()

    class Engine:
        async def generate(self, prompt, sampling_params, request_id):
            seen.append(sampling_params.output_kind)
            if sampling_params.output_kind == RequestOutputKind.DELTA:
                for ids in ([1], [2, 3], [625]):
                    yield out(ids)
            else:
                yield out([1, 2, 625])

    def prompt():
        return EnginePrompt({"prompt_token_ids": [1]}, SamplingParams(max_tokens=4), "abcdefgh12")

    async def go(whole: bool):
        ep = prompt()
        job = SpeechJob(Engine(), [ep], "r", whole=whole)
        await job.utterances[0].task
        job.close()
        return ep.sampling_params.output_kind, job.utterances[0].frames

    kind, frames = asyncio.run(go(True))
    assert seen[-1] == RequestOutputKind.FINAL_ONLY and frames == 2
    assert kind == RequestOutputKind.CUMULATIVE          # the caller's params are not modified
    kind, frames = asyncio.run(go(False))
    assert seen[-1] == RequestOutputKind.DELTA and frames == 3
    assert kind == RequestOutputKind.CUMULATIVE


def test_stream_reader_wakes_once_per_wait_not_per_frame(tmp_path, monkeypatch):
    """A streaming reader waiting for frame 40 of 60 is woken when 40 exist (and at the end),
    not on each of the 40 engine outputs before that: the event loop cost of N streams."""
    import asyncio

    from vllm import SamplingParams

    from chattts_vllm.gpt.requests import EnginePrompt
    from chattts_vllm.serving.streaming import Utterance

    monkeypatch.setenv("CHATTTS_VLLM_FRAME_DIR", str(tmp_path))

    class Engine:
        async def generate(self, prompt, sampling_params, request_id):
            for n in range(60):                  # one frame per output, as deltas
                await asyncio.sleep(0)
                yield type("Out", (), {"outputs": [type("C", (), {"token_ids": [n]})()]})()

    class CountingEvent(asyncio.Event):
        sets = 0

        def set(self) -> None:
            CountingEvent.sets += 1
            super().set()

    async def go():
        u = Utterance(Engine(), EnginePrompt({"prompt_token_ids": [1]}, SamplingParams(max_tokens=64),
                                             "abcdefgh12"), "r")
        u._changed = CountingEvent()
        await u.wait(40)
        frames, sets = u.frames, CountingEvent.sets
        await u.task
        u.close()
        return frames, sets

    frames, sets = asyncio.run(go())
    assert 40 <= frames < 60 and sets <= 2


def test_server_audio_defaults_to_bf16_on_the_gpu(monkeypatch):
    """GPU: bf16 (tensor cores); CPU: float32; CHATTTS_VLLM_AUDIO_DTYPE overrides either."""
    import torch

    from chattts_vllm.serving import service

    monkeypatch.delenv("CHATTTS_VLLM_AUDIO_DEVICE", raising=False)
    monkeypatch.delenv("CHATTTS_VLLM_AUDIO_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert service.audio_device() == ("cuda", torch.bfloat16)
    monkeypatch.setenv("CHATTTS_VLLM_AUDIO_DTYPE", "float32")
    assert service.audio_device() == ("cuda", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CHATTTS_VLLM_AUDIO_DTYPE")
    assert service.audio_device() == ("cpu", torch.float32)


def test_coalescer_metrics_are_read_at_scrape_time():
    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from chattts_vllm.audio.coalesce import Coalescer
    from chattts_vllm.serving.metrics import CoalescerCollector

    collector, registry = CoalescerCollector(), CollectorRegistry()
    registry.register(collector)
    assert b"chattts_audio_coalesce" not in generate_latest(registry)     # none live: no series
    with Coalescer() as co:
        collector.add(co)
        co.call(lambda x: x + 1, torch.zeros(2, 3))
        co.call(lambda x: x + 1, torch.zeros(1, 3))
        text = generate_latest(registry).decode()
    assert "chattts_audio_coalesce_jobs_total 2.0" in text
    assert "chattts_audio_coalesce_calls_total 2.0" in text
    assert "chattts_audio_coalesce_largest_batch 1.0" in text
