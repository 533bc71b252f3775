"""Distributed batch synthesis on Ray: a JSONL of `{id, text, voice, ...}` -> one WAV per line.

    chattts-vllm batch jobs.jsonl OUT_DIR --model MODEL_DIR [--address auto] [--num-actors N]

Each input line is one text; any field of the speech endpoint's request besides `input` may be
given (`voice`, `seed`, `speed`, `instructions`, `temperature`, `top_p`, `top_k`,
`repetition_penalty`, `min_new_token`, `max_new_token`) and is checked by the same validation, so a
bad line fails before any engine starts. Output: `OUT_DIR/<id>.wav` (24 kHz PCM16) and
`OUT_DIR/manifest.jsonl` (`id, path, duration, sample_rate, sha256`, one line per id).

Work is spread over Ray actors, one `ChatTTS` engine each (one GPU each, or `--engines-per-gpu N`
per GPU, or one CPU slot each on a machine without GPUs; `--pin-cores` gives each actor its own
slice of its node's cores), in chunks that become one engine batch. Nothing is lost or written twice:
- a worker writes each WAV to a temporary file and renames it into place, so a WAV either is
  complete or does not exist;
- only the driver writes the manifest, one fsynced line per finished id, after the WAV is in place;
- when an actor dies, the driver re-queues its chunk and starts a replacement actor;
- a rerun skips every id whose manifest line points at a WAV with that sha256 (resumable); the
  manifest is first rewritten without stale, duplicate or torn lines.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from chattts_vllm.cli import command
from chattts_vllm.serving.colocate import CoreSlot, one_start_per_gpu

MANIFEST = "manifest.jsonl"
SAMPLE_RATE = 24000
MODEL_NAME = "chattts"                     # the request model name the validation expects
ENV_PREFIXES = ("VLLM_", "CHATTTS_VLLM_", "HF_", "OMP_", "TORCH_")
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


# -- input lines --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchItem:
    """One checked input line. `request` is the speech endpoint's `SpeechRequest`."""

    id: str
    request: object                          # SpeechRequest (pickled to the actors)
    attempts: int = 0


def wav_name(item_id: str) -> str:
    """A file name for an id: the id itself when it is a safe name, else a sanitised one + hash."""
    if _SAFE_ID.fullmatch(item_id):
        return f"{item_id}.wav"
    digest = hashlib.sha256(item_id.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', item_id)[:64].lstrip('.')}-{digest}.wav"


def parse_item(line: str, lineno: int) -> BatchItem:
    """A JSONL line -> BatchItem, with the speech endpoint's validation (ValueError if bad)."""
    from chattts_vllm.serving.controls import refine_prompt
    from chattts_vllm.serving.protocol import SpeechError, parse_speech_request

    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {lineno}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), (str, int)):
        raise ValueError(f"line {lineno}: needs an object with an 'id' (string or integer)")
    if not isinstance(data.get("text"), str):
        raise ValueError(f"line {lineno}: 'text' must be a string")
    body = {k: v for k, v in data.items() if k not in ("id", "text", "model", "response_format",
                                                        "stream_format")}
    body.update(model=MODEL_NAME, input=data["text"])
    try:
        req = parse_speech_request(json.dumps(body).encode(), [MODEL_NAME])
        infer_params(req)                      # e.g. min_new_token > max_new_token
        refine_prompt(req.instructions)        # e.g. [laugh_5]
    except SpeechError as e:
        raise ValueError(f"line {lineno} (id {data['id']}): {e.message}") from None
    except ValueError as e:
        raise ValueError(f"line {lineno} (id {data['id']}): {e}") from None
    return BatchItem(str(data["id"]), req)


def read_items(path: str | os.PathLike) -> list[BatchItem]:
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = parse_item(line, lineno)
            if item.id in seen:
                raise ValueError(f"line {lineno}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    return items


def infer_params(req):
    """SpeechRequest -> InferCodeParams, as the speech endpoint maps it."""
    from chattts_vllm.params import InferCodeParams
    from chattts_vllm.serving.controls import speed_prompt

    return InferCodeParams(prompt=speed_prompt(req.speed), temperature=req.temperature,
                           top_P=req.top_p, top_K=req.top_k,
                           repetition_penalty=req.repetition_penalty, manual_seed=req.seed,
                           min_new_token=req.min_new_token, max_new_token=req.max_new_token)


# -- files ----------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _valid_entry(out_dir: Path, entry: dict) -> bool:
    import soundfile as sf

    try:
        path = out_dir / entry["path"]
        return (sha256_file(path) == entry["sha256"]
                and sf.info(str(path)).samplerate == entry["sample_rate"] == SAMPLE_RATE)
    except (OSError, KeyError, TypeError, RuntimeError):
        return False


class Manifest:
    """`manifest.jsonl`, written by the driver only: one fsynced line per finished id."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir / MANIFEST

    def load(self) -> dict[str, dict]:
        """Entries whose WAV is in place; rewrites the file to exactly those (last line wins)."""
        entries: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    entries[str(entry["id"])] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue                     # a torn last line from an interrupted run
        valid = {k: e for k, e in entries.items() if _valid_entry(self.out_dir, e)}
        write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in valid.values()).encode())
        return valid

    def append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def remove_stale_temps(out_dir: Path) -> None:
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# -- the worker (one engine per Ray actor) -----------------------------------------------------------

class SynthesisWorker:
    """One `ChatTTS` engine; turns a chunk of items into WAV files and manifest entries."""

    def __init__(self, model_dir: str, out_dir: str, engine_kwargs: dict,
                 pin_per_actor: dict[str, float] | None = None):
        # Before the engine starts its threads and its core process, which inherit the slice.
        self._core_slot, self.cores = pin_to_node_slot(pin_per_actor) if pin_per_actor else (None, None)
        self.out_dir = Path(out_dir)
        with one_start_per_gpu(self._gpu_ids()):
            self.tts = self._engine(model_dir, engine_kwargs)

    def _gpu_ids(self) -> list[str]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def _engine(self, model_dir: str, engine_kwargs: dict):
        from chattts_vllm import register
        from chattts_vllm.synthesize import ChatTTS

        register()
        return ChatTTS(model_dir, **engine_kwargs)

    def pid(self) -> int:
        return os.getpid()

    def run(self, items: list[BatchItem]) -> list[dict]:
        """One result per item: a manifest entry, or `{"id", "error"}` for an item that failed.

        A dead engine raises instead, so the driver replaces this actor and re-queues the chunk.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        from chattts_vllm.serving.controls import refine_prompt

        groups: dict[tuple, list[BatchItem]] = {}
        for it in items:                      # one refine prompt (and its seed) per synthesize call
            controls = refine_prompt(it.request.instructions)
            groups.setdefault((controls, it.request.seed if controls else None), []).append(it)
        results = []
        for (controls, seed), group in groups.items():
            try:
                results += self._synthesize(group, controls, seed)
            except EngineDeadError:
                raise
            except Exception:                 # find the bad item(s): one at a time
                for it in group:
                    try:
                        results += self._synthesize([it], controls, seed)
                    except EngineDeadError:
                        raise
                    except Exception as e:
                        results.append({"id": it.id, "error": f"{type(e).__name__}: {e}"})
        return results

    def _synthesize(self, items: list[BatchItem], controls: str | None, seed: int | None) -> list[dict]:
        from chattts_vllm.audio.formats import encode_audio
        from chattts_vllm.params import RefineTextParams

        reqs = [it.request for it in items]
        wavs = self.tts.synthesize([r.input for r in reqs], [infer_params(r) for r in reqs],
                                   voices=[r.voice_spec for r in reqs],
                                   skip_refine_text=controls is None,
                                   refine_params=RefineTextParams(prompt=controls or "",
                                                                  manual_seed=seed))
        out = []
        for it, wav in zip(items, wavs):
            data = encode_audio(wav, "wav")
            name = wav_name(it.id)
            write_atomic(self.out_dir / name, data)
            out.append({"id": it.id, "path": name, "duration": round(len(wav) / SAMPLE_RATE, 6),
                        "sample_rate": SAMPLE_RATE, "sha256": hashlib.sha256(data).hexdigest()})
        return out


# -- the driver ---------------------------------------------------------------------------------------

@dataclass
class BatchReport:
    total: int
    skipped: int = 0                          # already finished before this run
    written: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    actor_restarts: int = 0
    seconds: float = 0.0


def actor_env() -> dict[str, str]:
    """Variables a Ray worker on another node needs (Ray copies none of these by itself)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def default_actor_options(cpus_per_actor: float = 1.0, engines_per_gpu: int = 1) -> dict:
    """1 / `engines_per_gpu` of a GPU per actor where the cluster has GPUs, else `cpus_per_actor` CPUs."""
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1 / engines_per_gpu, "num_cpus": 1}
    return {"num_cpus": cpus_per_actor}


def per_actor(options: dict) -> dict[str, float]:
    """The resource that bounds how many actors fit: GPU share where one is asked for, else CPUs."""
    if options.get("num_gpus"):
        return {"GPU": options["num_gpus"]}
    return {"CPU": max(options.get("num_cpus", 1), 1e-3)}


def actors_that_fit(resources: dict, need: dict[str, float]) -> int:
    # 1 / 3 of a GPU three times is 1.0 only up to rounding: 1 // (1 / 3) == 2.0
    return max(1, min(int(resources.get(k, 0) / v + 1e-6) for k, v in need.items()))


def default_num_actors(options: dict) -> int:
    import ray

    return actors_that_fit(ray.cluster_resources(), per_actor(options))


def pin_to_node_slot(need: dict[str, float]) -> tuple[CoreSlot | None, list[int]]:
    """Pin this actor to its own slice of its node's cores, one slice per actor that fits on the
    node (serving/colocate.py: several host-bound engines on one GPU gain from not sharing cores)."""
    import ray

    from chattts_vllm.serving.colocate import pin_to_slot

    node = ray.get_runtime_context().get_node_id()
    res = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node)
    slot, cores = pin_to_slot(actors_that_fit(res, need))
    if slot is None:
        print(f"chattts-vllm: every core slot on this node is taken; actor {os.getpid()} "
              f"is not pinned", file=sys.stderr)
    else:
        import torch

        torch.set_num_threads(len(cores))       # the decode's CPU side: its own cores only
    return slot, cores                          # the caller holds the slot for its life


class _Pool:
    """Actor slots; a dead actor is replaced by a fresh one in the same slot (named `prefix-slot.gen`)."""

    def __init__(self, n: int, model_dir: str, out_dir: Path, engine_kwargs: dict, options: dict,
                 name_prefix: str, pin_cores: bool = False):
        import ray

        opts = dict(options)
        env = {**actor_env(), **opts.get("runtime_env", {}).get("env_vars", {})}
        opts["runtime_env"] = {**opts.get("runtime_env", {}), "env_vars": env}
        self._cls, self._opts = ray.remote(SynthesisWorker), opts
        self._args = (model_dir, str(out_dir), engine_kwargs)
        self._kwargs = {"pin_per_actor": per_actor(options)} if pin_cores else {}
        self.prefix, self.generation = name_prefix, [0] * n
        self.actors = [self._start(i) for i in range(n)]

    def _start(self, slot: int):
        name = f"{self.prefix}-{slot}.{self.generation[slot]}"
        return self._cls.options(**self._opts, name=name).remote(*self._args, **self._kwargs)

    def restart(self, slot: int) -> None:
        import ray

        ray.kill(self.actors[slot], no_restart=True)
        self.generation[slot] += 1
        self.actors[slot] = self._start(slot)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


def run_batch(items: list[BatchItem], out_dir: str | os.PathLike, model_dir: str | os.PathLike, *,
              engine_kwargs: dict | None = None, num_actors: int | None = None,
              actor_options: dict | None = None, chunk_size: int = 16, max_attempts: int = 3,
              cpus_per_actor: float = 1.0, max_restarts: int | None = None, progress: bool = True,
              address: str | None = None, name_prefix: str | None = None,
              engines_per_gpu: int = 1, pin_cores: bool = False) -> BatchReport:
    """Synthesise every item not yet in the manifest on Ray actors.

    Joins the Ray cluster at `address` (or the one already initialised; None: a local one) only
    when there is work left. `engines_per_gpu` > 1 puts that many engines on each GPU, each with
    that share of its memory unless `engine_kwargs` sets `gpu_memory_utilization`; `pin_cores`
    gives each actor its own slice of its node's cores.
    """
    import ray
    from tqdm import tqdm

    if engines_per_gpu < 1:
        raise ValueError(f"engines_per_gpu must be at least 1, got {engines_per_gpu}")
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    manifest = Manifest(out)
    done = manifest.load()
    todo = [it for it in items if it.id not in done]
    report = BatchReport(total=len(items), skipped=len(items) - len(todo))
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report
    if not ray.is_initialized():
        ray.init(address=address)
    options = actor_options or default_actor_options(cpus_per_actor, engines_per_gpu)
    engine_kwargs = engine_kwargs_for(engine_kwargs or {}, options)
    n = min(num_actors or default_num_actors(options), -(-len(todo) // chunk_size))
    max_restarts = 3 * n if max_restarts is None else max_restarts
    queue = deque(todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size))
    pool = _Pool(n, str(Path(model_dir).resolve()), out, engine_kwargs, options,
                 name_prefix or f"chattts-batch-{uuid.uuid4().hex[:8]}", pin_cores=pin_cores)
    inflight: dict = {}                       # ObjectRef -> (slot, chunk)
    bar = tqdm(total=len(items), initial=report.skipped, unit="utt", disable=not progress,
               dynamic_ncols=True)
    try:
        while queue or inflight:
            busy = {slot for slot, _ in inflight.values()}
            for slot in range(n):
                if queue and slot not in busy:
                    chunk = queue.popleft()
                    inflight[pool.actors[slot].run.remote(chunk)] = (slot, chunk)
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, chunk = inflight.pop(ref)
            try:
                results = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                # the actor died, or raised (its engine died): replace it, re-queue its chunk
                requeue_failed(queue, chunk, max_attempts, report, e)
                report.actor_restarts += 1
                if report.actor_restarts > max_restarts:
                    raise RuntimeError(f"actors died {report.actor_restarts} times; last: {e}") from e
                pool.restart(slot)
                bar.set_postfix(restarts=report.actor_restarts)
                continue
            for r in results:
                if "error" in r:
                    report.failed[r["id"]] = r["error"]
                else:
                    manifest.append(r)
                    report.written += 1
                bar.update(1)
    finally:
        bar.close()
        pool.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


def engine_kwargs_for(engine_kwargs: dict, options: dict) -> dict:
    """An engine on a fraction of a GPU asks vLLM for that fraction of its memory (vLLM's
    `gpu_memory_utilization` is per engine, 0.9 by default: a second engine would not start)."""
    share = options.get("num_gpus", 0)
    if 0 < share < 1 and "gpu_memory_utilization" not in engine_kwargs:
        return {**engine_kwargs, "gpu_memory_utilization": round(0.9 * share, 3)}
    return dict(engine_kwargs)


def requeue_failed(queue: deque, chunk: list[BatchItem], max_attempts: int, report: BatchReport,
                   cause: Exception) -> None:
    """A dead actor's chunk goes back to the front, one item per chunk after the first death, so an
    item that kills its actor every time is found and given up after `max_attempts`."""
    for it in reversed(chunk):
        it = BatchItem(it.id, it.request, it.attempts + 1)
        if it.attempts >= max_attempts:
            report.failed[it.id] = f"its actor failed {it.attempts} times ({type(cause).__name__})"
        else:
            queue.appendleft([it])


# -- `chattts-vllm batch` -------------------------------------------------------------------------------

def _batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", help="JSONL: one {id, text, voice, seed, speed, ...} object per line")
    p.add_argument("out_dir", help="where the WAVs and manifest.jsonl go (rerun to resume)")
    p.add_argument("--model", required=True, help="converted model folder or official asset/ folder")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. 'auto'); default: start a local one")
    p.add_argument("--num-actors", type=int, default=None,
                   help="engines (default: one per GPU, else one per --cpus-per-actor CPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPU-only clusters")
    p.add_argument("--engines-per-gpu", type=int, default=1,
                   help="engines sharing each GPU (host-bound engines: 3 per H200 gave the most "
                        "audio-s/s; run them under MPS); each gets that share of the GPU's memory")
    p.add_argument("--pin-cores", action="store_true",
                   help="each actor on its own slice of its node's CPU cores")
    p.add_argument("--chunk-size", type=int, default=16, help="items per engine call")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="give an item up after its actor died this many times")
    p.add_argument("--engine-kwargs", type=json.loads, default={},
                   help='vLLM engine arguments as JSON, e.g. \'{"max_model_len": 2048}\'')
    p.add_argument("--no-progress", action="store_true")


@command("batch", "JSONL of texts -> WAVs + manifest, spread over Ray actors (resumable)", _batch_args)
def _batch(args: argparse.Namespace) -> int:
    from chattts_vllm.serving.cli import resolve_model_dir

    items = read_items(args.jobs)
    model = resolve_model_dir(args.model)
    report = run_batch(items, args.out_dir, model, engine_kwargs=args.engine_kwargs,
                       num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor,
                       chunk_size=args.chunk_size, max_attempts=args.max_attempts,
                       progress=not args.no_progress, address=args.address,
                       engines_per_gpu=args.engines_per_gpu, pin_cores=args.pin_cores)
    for item_id, err in report.failed.items():
        print(f"failed: {item_id}: {err}", file=sys.stderr)
    print(f"{report.written} written, {report.skipped} already done, {len(report.failed)} failed, "
          f"{report.actor_restarts} actor restarts, {report.seconds:.1f} s -> "
          f"{Path(args.out_dir) / MANIFEST}")
    return 1 if report.failed else 0
