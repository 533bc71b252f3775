"""vLLM's `AsyncLLM` with its engine core in this process, on a thread of its own.

vLLM 0.26's `AsyncLLM` always starts its `EngineCore` in a child process (`AsyncMPClient`);
`VLLM_ENABLE_V1_MULTIPROCESSING=0` only affects the synchronous `LLMEngine`. Where that child
process cannot be used (on the GPU machine it once hung at start-up under vLLM's default `fork`
start; `chattts-vllm serve` now asks for `spawn` there, see cli.serve_env) this builds the same `AsyncLLM`
with `InprocAsyncClient` in place of `AsyncMPClient`: everything above the engine core (input and
output processing, request streams, aborts on cancellation, health) is vLLM's own code, and the
core is vLLM's own `EngineCore` stepped as `EngineCoreProc.run_busy_loop` steps it, without ZMQ.

One thread owns the core: it builds it (model load, torch.compile, CUDA graphs happen there, as they
would in the child process) and then takes client calls from a queue between steps. Outputs are
handed to the event loop with `call_soon_threadsafe`. The GIL is shared with the event loop, which
the child process would not share; the GPU waits release it.

    async with build_inproc_async_engine(AsyncEngineArgs(model=...)) as engine:   # an AsyncLLM
        ...

`ray_app.SpeechEngine` uses it when the replica's environment has
`VLLM_ENABLE_V1_MULTIPROCESSING=0`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)      # no vllm import here: `chattts-vllm serve` reads
                                          # `inproc_requested` before it execs the server

_STOP = object()


def inproc_requested(environ=os.environ) -> bool:
    """True where `VLLM_ENABLE_V1_MULTIPROCESSING` switches multiprocessing off ("0"/"false")."""
    return environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip().lower() in ("0", "false")


class _Resources:
    engine_dead = False


class InprocAsyncClient:
    """The `AsyncMPClient` surface that `AsyncLLM` uses, over an `EngineCore` on one thread.

    Every call into the core runs on the core's thread, in the order the calls were made: adds and
    aborts before the next step, utility calls (`<name>_async` -> `EngineCore.<name>`) likewise.
    """

    def __init__(self, vllm_config, executor_class, log_stats: bool, client_addresses=None,
                 client_count: int = 1, client_index: int = 0):
        if vllm_config.parallel_config.data_parallel_size > 1:
            raise NotImplementedError("the in-process engine core serves one data-parallel rank")
        self._loop = asyncio.get_running_loop()
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self.resources = _Resources()
        self.engine_ranks_managed = [0]
        self.client_index = client_index
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, name="chattts-engine-core", daemon=True,
                                        args=(vllm_config, executor_class, log_stats, ready))
        self._thread.start()
        ready.result()                      # the core is built (or its error is raised here)

    # -- the core's thread --------------------------------------------------------------------
    def _run(self, vllm_config, executor_class, log_stats: bool, ready: Future) -> None:
        from vllm.v1.engine.core import EngineCore

        try:
            core = EngineCore(vllm_config, executor_class, log_stats)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor
            self.resources.engine_dead = True
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            self._busy_loop(core)
        except BaseException as e:  # noqa: BLE001 - the engine is dead: tell the output handler
            logger.exception("in-process engine core failed")
            self.resources.engine_dead = True
            self._to_loop(self._outputs.put_nowait, e)
            self._fail_pending(e)
        finally:
            with contextlib.suppress(Exception):
                core.shutdown()

    def _to_loop(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):         # the event loop is already closed
            self._loop.call_soon_threadsafe(fn, *args)

    def _fail_pending(self, e: BaseException) -> None:
        while True:
            try:
                item = self._inputs.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[2] is not None:
                self._to_loop(_set_exception, item[2], RuntimeError(f"engine core died: {e!r}"))

    def _has_work(self, core) -> bool:
        return core.scheduler.has_requests() or bool(core.batch_queue)

    def _busy_loop(self, core) -> None:
        while True:
            # 1) Client calls: wait for one while idle, then take all that are queued.
            block = not self._has_work(core)
            while True:
                try:
                    item = self._inputs.get(block=block)
                except queue.Empty:
                    break
                if item is _STOP:
                    return
                self._handle(core, item)
                block = False
            # 2) One step; its outputs go to the event loop.
            outputs, executed = core.step_fn()
            core.post_step(executed)
            out = outputs.get(0) if outputs else None
            if out is not None and (out.outputs or out.scheduler_stats):
                self._to_loop(self._outputs.put_nowait, out)
            if not executed and core.scheduler.has_requests():
                time.sleep(0.001)                       # as EngineCoreProc: let other threads run

    def _handle(self, core, item) -> None:
        kind, payload, fut = item
        try:
            if kind == "add":
                req, wave = core.preprocess_add_request(payload)
                core.add_request(req, wave)
                result = None
            elif kind == "abort":
                core.abort_requests(payload)
                result = None
            else:
                method, args = payload
                result = getattr(core, method)(*args)
        except Exception as e:  # noqa: BLE001 - the caller's error, not the engine's
            self._to_loop(_set_exception, fut, e)
            return
        self._to_loop(_set_result, fut, result)

    # -- the event loop's side ----------------------------------------------------------------
    def _call(self, kind: str, payload) -> asyncio.Future:
        if self.resources.engine_dead:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError()
        fut = self._loop.create_future()
        self._inputs.put((kind, payload, fut))
        return fut

    async def get_output_async(self):
        out = await self._outputs.get()
        if isinstance(out, BaseException):
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError() from out
        return out

    async def add_request_async(self, request) -> None:
        request.client_index = self.client_index
        await self._call("add", request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids and not self.resources.engine_dead:
            await self._call("abort", list(request_ids))

    async def call_utility_async(self, method: str, *args) -> Any:
        return await self._call("utility", (method, args))

    def __getattr__(self, name: str):
        # `reset_mm_cache_async()`, `collective_rpc_async(...)`, `profile_async(...)`, ...:
        # the `EngineCore` method of the same name without `_async`, run on the core's thread.
        if name.endswith("_async") and not name.startswith("_"):
            method = name[: -len("_async")]

            async def call(*args):
                return await self.call_utility_async(method, *args)
            return call
        raise AttributeError(name)

    def dp_engines_running(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._inputs.put(_STOP)
            self._thread.join(timeout if timeout else 60)


def _set_result(fut: asyncio.Future, result) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future, e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


@contextlib.contextmanager
def core_client_in_process() -> Iterator[None]:
    """While open, every `AsyncLLM` built gets `InprocAsyncClient` for its engine core.

    `AsyncLLM.__init__` asks `EngineCoreClient.make_async_mp_client` for its client; this swaps
    that factory for the duration (construction only: the client object is what stays)."""
    from vllm.v1.engine.core_client import EngineCoreClient

    factory = EngineCoreClient.__dict__["make_async_mp_client"]
    EngineCoreClient.make_async_mp_client = staticmethod(lambda **kw: InprocAsyncClient(**kw))
    try:
        yield
    finally:
        EngineCoreClient.make_async_mp_client = factory


@contextlib.asynccontextmanager
async def build_inproc_async_engine(engine_args, usage_context=None) -> AsyncIterator[Any]:
    """An `AsyncLLM` whose engine core runs in this process (see the module docstring).

    Built as `build_async_engine_client_from_engine_args` builds it, with `InprocAsyncClient` for
    the client (`core_client_in_process`).
    """
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_config = engine_args.create_engine_config(
        usage_context=usage_context or UsageContext.OPENAI_API_SERVER)
    logger.info("starting the engine core in this process (pid %d), on its own thread", os.getpid())
    with core_client_in_process():
        engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config, usage_context=usage_context or UsageContext.OPENAI_API_SERVER,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats)
    try:
        await engine.reset_mm_cache()
        yield engine
    finally:
        engine.shutdown(timeout=vllm_config.shutdown_timeout)
