"""The `chattts-vllm` command.

Subcommands live in a registry: `@command(name, help, arguments)` on a handler `run(args) -> int`.
`arguments(parser)` only declares options; handlers import heavy modules (torch, vLLM) themselves, so
`chattts-vllm --help` stays fast. Modules listed in `COMMAND_MODULES` are imported to register theirs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable

Handler = Callable[[argparse.Namespace], "int | None"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler


COMMANDS: dict[str, Command] = {}
COMMAND_MODULES: tuple[str, ...] = ("chattts_vllm.serving.cli",  # synthesize, demo, serve
                                    "chattts_vllm.serving.ray_batch")  # batch


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated handler as subcommand `name`."""
    def register(run: Handler) -> Handler:
        COMMANDS[name] = Command(name, help, arguments, run)
        return run
    return register


# -- checkpoints ------------------------------------------------------------------------------

def _random_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="where to write the asset/ layout (official file names)")
    p.add_argument("--num-layers", type=int, default=20, help="Llama layers (official: 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convert", metavar="OUT_DIR", help="also convert it into a vLLM model folder")


@command("make-random-checkpoint", "random weights in the official 2Noise/ChatTTS asset/ layout",
         _random_args)
def _make_random_checkpoint(args: argparse.Namespace) -> int:
    from chattts_vllm.checkpoint import convert, write_random_asset

    asset = write_random_asset(args.dir, num_layers=args.num_layers, seed=args.seed, progress=True)
    print(f"wrote random asset: {asset}")
    if args.convert:
        print(f"wrote model: {convert(asset, args.convert, progress=True)}")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("asset_dir", help="an official asset/ folder (gpt/, Embed.safetensors, ...)")
    p.add_argument("out_dir", help="the model folder to write (config.json, model.safetensors, ...)")
    p.add_argument("--speaker-stats", metavar="FILE",
                   help="speaker std+mean (1536 values) when the asset has no spk_stat.pt")


@command("convert", "official asset/ folder -> vLLM model folder", _convert_args)
def _convert(args: argparse.Namespace) -> int:
    from chattts_vllm.checkpoint import convert

    out = convert(args.asset_dir, args.out_dir, speaker_stats=args.speaker_stats, progress=True)
    print(f"wrote model: {out}")
    return 0


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="the model folder to write")
    p.add_argument("--repo-id", default="2Noise/ChatTTS")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--speaker-stats", metavar="FILE",
                   help="speaker std+mean (1536 values) if the repository has no spk_stat.pt")


@command("download", "fetch 2Noise/ChatTTS from the Hugging Face Hub and convert it", _download_args)
def _download(args: argparse.Namespace) -> int:
    from chattts_vllm.checkpoint import download
    from chattts_vllm.checkpoint_download import DownloadError

    try:
        out = download(args.dest, repo_id=args.repo_id, revision=args.revision,
                       speaker_stats=args.speaker_stats)
    except DownloadError as e:
        raise SystemExit(f"chattts-vllm download: error: {e}") from None
    print(f"wrote model: {out}")
    return 0


# -- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="chattts-vllm",
                                     description="ChatTTS text-to-speech on vLLM")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (OSError, ValueError) as e:
        # Expected failures (missing folder, wrong checkpoint): a message, not a traceback.
        print(f"chattts-vllm {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Under `python -m`, this file runs as __main__ while command modules register into the
    # importable chattts_vllm.cli: dispatch through that one registry.
    from chattts_vllm.cli import main as _main

    sys.exit(_main())
