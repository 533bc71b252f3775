"""Ray Serve: OpenAI `POST /v1/audio/speech` over N ChatTTS engine replicas.

    serve run configs/ray-serve.yaml                        # autoscaling, see the file
    serve run chattts_vllm.serving.ray_app:build_app model=./chattts-model

Two deployments:
- `SpeechEngine`: one vLLM `AsyncLLM`, built by vLLM's own `build_async_engine_client_from_engine_args`
  (as `vllm serve` builds it), and the endpoint plugin's `SpeechService` set up by the plugin's own
  `init_state` (text front end, voices, Decoder + Vocos). One GPU each (or 1/N with
  `engines_per_gpu`, optionally on pinned cores: `pin_cores`), or CPU slots locally.
  With `VLLM_ENABLE_V1_MULTIPROCESSING=0` in the replica's environment (`ray_actor_options:
  runtime_env: env_vars`, or the driver's), its engine core runs in the replica process
  (serving/inproc.py) rather than in a child process.
  It runs serving/speech.py's code paths (`prepare`, `encoded_stream`), so bodies, errors and
  streams equal those of `vllm serve` with the plugin.
- `SpeechIngress`: the FastAPI ingress. It parses the request with the endpoint's own
  `parse_speech_request` (bad requests never reach an engine) and forwards it to an engine
  replica. A replica that dies before the first audio byte is retried on another one
  (`max_attempts`); after that a stream ends the way a failed `vllm serve` stream ends (an SSE
  `error` event, or a chunked body cut short).

Every response carries `X-Replica-Id`, the Serve replica that made the audio; a whole file also
`X-Synthesis-Seconds`, the time it took inside that replica. Multi-GPU engines
(vLLM's Ray executor, tensor/pipeline or data parallel) go through `engine_kwargs`; see
`engine_deployment_options`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from chattts_vllm.audio.formats import MEDIA_TYPES, encode_audio
from chattts_vllm.serving.protocol import SpeechError, SpeechRequest, parse_speech_request
from chattts_vllm.serving.service import Prepared
from chattts_vllm.serving.speech import ClosingStream, encoded_stream, server_error
from chattts_vllm.text.speaker import VOICES

logger = logging.getLogger("ray.serve")
REPLICA_HEADER = "X-Replica-Id"
RETRYABLE = (RayActorError, ReplicaUnavailableError)     # the replica died or went away


@dataclass
class Reply:
    """A response from an engine replica: a whole body, or the head of a stream (body empty)."""

    status: int
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def error(cls, e: SpeechError, headers: dict[str, str]) -> Reply:
        return cls(e.status, "application/json", headers, JSONResponse(e.body()).body)

    def response(self) -> Response:
        return Response(self.body, self.status, self.headers, self.media_type)


# -- engine replica --------------------------------------------------------------------------------

class SpeechEngine:
    """One vLLM engine with the speech service of serving/: what `vllm serve` + plugin runs."""

    async def __init__(self, model_dir: str, served_model_names: list[str], engine_kwargs: dict,
                 pin_per_actor: dict[str, float] | None = None):
        import ray
        from vllm.engine.arg_utils import AsyncEngineArgs

        from chattts_vllm import register
        from chattts_vllm.serving.colocate import one_start_per_gpu
        from chattts_vllm.serving.inproc import build_inproc_async_engine, inproc_requested
        from chattts_vllm.serving.ray_batch import pin_to_node_slot
        from chattts_vllm.serving.speech import STATE_KEY, SpeechPlugin

        # Before the engine starts its threads and its core process, which inherit the slice.
        self._core_slot = pin_to_node_slot(pin_per_actor)[0] if pin_per_actor else None
        register()                                      # the model plugin, in this process too
        self._stack = contextlib.AsyncExitStack()
        args = AsyncEngineArgs(model=model_dir, served_model_name=served_model_names, **engine_kwargs)
        # VLLM_ENABLE_V1_MULTIPROCESSING=0 in the replica's environment: the engine core runs in
        # this process (serving/inproc.py) instead of the child process AsyncLLM starts.
        if inproc_requested():
            build = build_inproc_async_engine
        else:
            from vllm.entrypoints.openai.api_server import (
                build_async_engine_client_from_engine_args as build)
        # Replicas sharing a GPU start one at a time (serving/colocate.py); waited for off the loop.
        gate = one_start_per_gpu([str(g) for g in ray.get_gpu_ids()])
        await asyncio.to_thread(gate.__enter__)
        try:
            self.engine = await self._stack.enter_async_context(build(args))
        finally:
            gate.__exit__(None, None, None)
        state = SimpleNamespace()
        await SpeechPlugin().init_state(self.engine, state, SimpleNamespace(
            model=model_dir, served_model_name=served_model_names))
        self.service = getattr(state, STATE_KEY, None)
        if self.service is None:
            raise RuntimeError(f"{model_dir} is not a ChatTTS model folder")
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()

    def _headers(self, **extra: str) -> dict[str, str]:
        return {REPLICA_HEADER: self.replica_id, **extra}

    async def _prepare(self, req: SpeechRequest) -> Prepared | Reply:
        try:
            return await self.service.prepare(req, f"speech-{uuid.uuid4().hex}")
        except SpeechError as e:
            return Reply.error(e, self._headers())

    async def speech(self, req: SpeechRequest) -> Reply:
        """The whole file (no `stream_format`), as serving/speech.py's `_respond` makes it."""
        t0 = time.perf_counter()
        prepared = await self._prepare(req)
        if isinstance(prepared, Reply):
            return prepared
        job = self.service.start(prepared, whole=True)
        try:
            wav = await job.waveform(self.service.audio)
            data = await self.service.audio.run(encode_audio, wav, req.response_format)
        except Exception as e:
            logger.exception("speech request %s failed", prepared.request_id)
            return Reply.error(server_error(e), self._headers())
        finally:
            job.close()
        return Reply(200, MEDIA_TYPES[req.response_format], self._headers(
            **{"X-Audio-Frames": str(job.frames),
               "X-Synthesis-Seconds": f"{time.perf_counter() - t0:.3f}"}), data)

    async def speech_stream(self, req: SpeechRequest) -> AsyncIterator[Reply | bytes]:
        """A `Reply` head (or the error), then the audio bytes / SSE events of `encoded_stream`."""
        prepared = await self._prepare(req)
        if isinstance(prepared, Reply):
            yield prepared
            return
        sse = req.stream_format == "sse"
        job = self.service.start(prepared)              # the engine starts before the head goes out
        body = encoded_stream(self.service, job, prepared, req, sse)
        try:
            yield Reply(200, "text/event-stream" if sse else MEDIA_TYPES[req.response_format],
                        self._headers())
            async for chunk in body:
                yield chunk
        finally:
            try:
                await body.aclose()
            finally:
                job.close()                             # aborts the engine requests if cut short

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises (e.g. the engine core died)."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        await self._stack.aclose()


# -- ingress -----------------------------------------------------------------------------------------

app = FastAPI(title="ChatTTS speech on Ray Serve")


@serve.ingress(app)
class SpeechIngress:
    """OpenAI-compatible routes; engine calls are retried on another replica if theirs died."""

    def __init__(self, engine: DeploymentHandle, served_model_names: list[str], max_attempts: int = 3,
                 retry_delay_s: float = 0.5):
        self.engine = engine
        self.served_models = served_model_names
        self.max_attempts = max(1, max_attempts)
        self.retry_delay_s = retry_delay_s

    async def _retry(self, what: str, attempt: int, e: BaseException) -> None:
        if attempt + 1 >= self.max_attempts:
            raise e
        logger.warning("%s: engine replica lost (%s); retrying (%d/%d)", what, type(e).__name__,
                       attempt + 2, self.max_attempts)
        await asyncio.sleep(self.retry_delay_s * 2 ** attempt)

    @app.post("/v1/audio/speech")
    async def create_speech(self, request: Request) -> Response:
        try:
            req = parse_speech_request(await request.body(), self.served_models)
        except SpeechError as e:
            return JSONResponse(e.body(), status_code=e.status)
        try:
            if req.stream_format is None:
                return (await self._whole(req)).response()
            return await self._stream(req)
        except RETRYABLE as e:
            err = SpeechError(f"no engine replica could serve the request ({type(e).__name__})",
                              None, None, 503, "service_unavailable")
            return JSONResponse(err.body(), status_code=503)

    async def _whole(self, req: SpeechRequest) -> Reply:
        for attempt in range(self.max_attempts):
            try:
                return await self.engine.speech.remote(req)
            except RETRYABLE as e:
                await self._retry("speech", attempt, e)
        raise AssertionError("unreachable")

    async def _stream(self, req: SpeechRequest) -> Response:
        """Waits for the head and the first audio bytes (retrying), then relays the rest."""
        for attempt in range(self.max_attempts):
            gen = self.engine.options(stream=True).speech_stream.remote(req)
            try:
                head: Reply = await gen.__anext__()
                first = await anext(gen, b"") if head.status == 200 else b""
                break
            except RETRYABLE as e:
                gen.cancel()
                await self._retry("speech stream", attempt, e)
            except BaseException:
                gen.cancel()
                raise
        if head.status != 200:
            gen.cancel()
            return head.response()
        sse = req.stream_format == "sse"
        return ClosingStream(self._relay(first, gen, sse, head), media_type=head.media_type,
                             headers=head.headers)

    @staticmethod
    async def _relay(first: bytes, gen, sse: bool, head: Reply) -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in gen:
                yield chunk
        except RETRYABLE as e:
            logger.warning("speech stream from %s lost mid-stream: %s", head.headers.get(REPLICA_HEADER), e)
            if not sse:
                raise                                   # the chunked body ends without its terminator
            yield b"data: " + json.dumps({"type": "error", **server_error(e).body()}).encode() + b"\n\n"
        finally:
            gen.cancel()                                # a client that left aborts the engine work

    @app.get("/v1/audio/voices")
    async def voices(self) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "voice", "seed": seed} for name, seed in VOICES.items()],
            "also_accepted": ["seed:<int>", "an upstream ChatTTS speaker string", '{"id": <either>}']})

    @app.get("/v1/models")
    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "chattts-vllm"} for name in self.served_models]})

    @app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)


# -- builder -----------------------------------------------------------------------------------------

def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def _flag(value) -> bool:
    """A YAML bool, or the string `serve run ... key=true` passes."""
    return str(value).lower() in ("1", "true", "yes")


def engines_per_gpu(args: dict) -> int:
    n = int(args.get("engines_per_gpu", 1))
    if n < 1:
        raise ValueError(f"engines_per_gpu must be at least 1, got {n}")
    return n


def engine_deployment_options(args: dict) -> dict:
    """Deployment options of `SpeechEngine`: replicas or autoscaling, and where an engine runs.

    - default: one GPU per replica (`num_gpus: 1`, or 1 / `engines_per_gpu`) when the cluster
      has GPUs, else one CPU;
    - tensor/pipeline parallel > 1 through vLLM's Ray executor (`distributed_executor_backend:
      ray`): a placement group of one GPU bundle per worker, the replica in the first (as Ray Serve
      LLM does), so the engine's workers land beside their replica;
    - data parallel with `data_parallel_backend: ray`: the replica reserves no GPU; vLLM's Ray DP
      backend places its engine-core actors itself.
    """
    kw = args.get("engine_kwargs") or {}
    world = int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))
    actor = dict(args.get("ray_actor_options") or {})
    opts: dict = {"max_ongoing_requests": int(args.get("max_ongoing_requests", 32)),
                  "health_check_period_s": float(args.get("health_check_period_s", 10)),
                  "graceful_shutdown_timeout_s": float(args.get("graceful_shutdown_timeout_s", 30))}
    use_gpu = args.get("use_gpu")          # `serve run ... use_gpu=false` passes a string
    gpus = _cluster_has_gpus() if use_gpu is None else _flag(use_gpu)
    if kw.get("data_parallel_backend") == "ray" and int(kw.get("data_parallel_size", 1)) > 1:
        actor.setdefault("num_cpus", 1)
        actor["num_gpus"] = 0
    elif world > 1 and kw.get("distributed_executor_backend") == "ray":
        cpus = actor.setdefault("num_cpus", 1)
        actor["num_gpus"] = 0
        worker = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        opts["placement_group_bundles"] = [{**worker, "CPU": worker["CPU"] + cpus}] + [worker] * (world - 1)
        opts["placement_group_strategy"] = args.get("placement_group_strategy", "PACK")
    elif gpus:
        actor.setdefault("num_gpus", 1 / engines_per_gpu(args))
        actor.setdefault("num_cpus", 1)
    else:
        actor.setdefault("num_cpus", 1)
    from chattts_vllm.serving.ray_batch import actor_env

    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**actor_env(), **runtime_env.get("env_vars", {})}
    actor["runtime_env"] = runtime_env
    opts["ray_actor_options"] = actor
    if args.get("autoscaling_config"):
        opts["autoscaling_config"] = dict(args["autoscaling_config"])
    else:
        opts["num_replicas"] = int(args.get("num_replicas", 1))
    return opts


def build_app(args: dict) -> serve.Application:
    """The Serve application. `args` (a `serve run` config's `args:`):

    model                  converted model folder or official asset/ folder (required)
    served_model_name      name(s) clients send as `model` (default "chattts")
    engine_kwargs          vLLM engine arguments (dtype, max_model_len, max_num_seqs, ...)
    num_replicas           engine replicas (default 1), or
    autoscaling_config     {min_replicas, max_replicas, target_ongoing_requests, ...}
    max_ongoing_requests   per engine replica (default 32)
    ray_actor_options      per engine replica (default: num_gpus 1 with GPUs, else num_cpus 1)
    engines_per_gpu        replicas per GPU (default 1): num_gpus 1/N and, unless engine_kwargs
                           sets it, gpu_memory_utilization 0.9/N; replicas on one GPU start one
                           at a time
    pin_cores              each replica (and its engine core) on its own slice of its node's cores
    use_gpu                force GPU (true) or CPU (false) replicas; default: what the cluster has
    ingress                {num_replicas, ray_actor_options, max_attempts, retry_delay_s}
    """
    from chattts_vllm.serving.cli import resolve_model_dir
    from chattts_vllm.serving.ray_batch import engine_kwargs_for, per_actor

    if "model" not in args:
        raise ValueError("build_app needs args['model'] (a model folder)")
    names = args.get("served_model_name", "chattts")
    names = [names] if isinstance(names, str) else list(names)
    model = str(resolve_model_dir(args["model"]))
    opts = engine_deployment_options(args)
    engine = serve.deployment(SpeechEngine, name="SpeechEngine", **opts)
    actor = opts["ray_actor_options"]
    engine_kwargs = engine_kwargs_for(dict(args.get("engine_kwargs") or {}), actor)
    pin = per_actor(actor) if _flag(args.get("pin_cores", False)) else None
    ing = dict(args.get("ingress") or {})
    ingress = serve.deployment(SpeechIngress, name="SpeechIngress",
                               num_replicas=int(ing.get("num_replicas", 1)),
                               ray_actor_options=ing.get("ray_actor_options", {"num_cpus": 0}),
                               max_ongoing_requests=int(ing.get("max_ongoing_requests", 1000)))
    return ingress.bind(engine.bind(model, names, engine_kwargs, pin), names,
                        int(ing.get("max_attempts", 3)), float(ing.get("retry_delay_s", 0.5)))
