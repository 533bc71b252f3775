"""Triton autotune picks kept on disk, so a new process on the same GPU skips re-benchmarking.

Triton's own disk cache (`cache_results=True`, TRITON_CACHE_AUTOTUNING) gives up whenever a config
has a `pre_hook`, and our TMA configs set their boxes in one (kernels/convnext.py `_configs`). So
this module stores, per registered Autotuner, each tuning key → the index of the picked config in
`tuner.configs`, and puts those configs back into `tuner.cache` in the next process; hooks stay on
the live Config objects, nothing of them is serialized.

File: $CHATTTS_VLLM_TUNE_CACHE (a JSON path; "0" or "off" turns the feature off), else
~/.cache/chattts_vllm/autotune-<GPU name>-triton<version>.json. Only on CUDA (never under
TRITON_INTERPRET=1). A missing or corrupt file is a warning, never an error: the worst case is
today's behaviour, autotuning from scratch.

Each tuner's entries carry a fingerprint of its config list and key names; after either changes,
the old indices would point at other configs, so they are ignored. (An edit to a kernel's body
keeps its entries: delete the file, or set the variable to "off", when that matters.)
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

ENV = "CHATTTS_VLLM_TUNE_CACHE"
VERSION = 1

_log = logging.getLogger(__name__)
_TUNERS: dict[str, Any] = {}          # name → triton Autotuner (or anything with .configs, .cache)
_lock = threading.Lock()
_loaded = False
_path: Path | None = None             # resolved by load(); save() at exit must not touch CUDA
_atexit_registered = False
_warned: set[str] = set()


def register(name: str, tuner: Any) -> Any:
    """Adds an Autotuner to the cache under a stable name; returns it (usable inline)."""
    _TUNERS[name] = tuner
    return tuner


def _warn(tag: str, msg: str) -> None:
    """Logs each kind of problem once per process: the cache is an optimisation, not worth noise."""
    if tag not in _warned:
        _warned.add(tag)
        _log.warning("autotune cache: %s", msg)


def cache_path() -> Path | None:
    """The JSON file to use, or None when the variable turns the feature off. May query the GPU."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("0", "off"):
        return None
    if env:
        return Path(env).expanduser()
    import torch
    import triton

    try:
        gpu = torch.cuda.get_device_name()
    except (RuntimeError, AssertionError):      # no usable CUDA: only reached when forced
        gpu = "unknown"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_") or "unknown"
    return Path.home() / ".cache" / "chattts_vllm" / f"autotune-{slug}-triton{triton.__version__}.json"


def _cuda_ok() -> bool:
    """Picks are only meaningful for real GPU launches (the interpreter never autotunes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except (ImportError, RuntimeError):
        return False


def fingerprint(tuner: Any) -> str:
    """sha1 over the key names and every config's launch parameters, in order: an index stored
    under another config list would name a different config."""
    parts = [repr(list(getattr(tuner, "keys", None) or []))]
    for c in tuner.configs:
        parts.append(repr((c.kwargs, c.num_warps, c.num_stages, getattr(c, "num_ctas", 1),
                           getattr(c, "maxnreg", None))))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _plain(v: Any) -> bool:
    """Whether a key value survives JSON (tuples come back as lists; `_to_key` restores them)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(_plain(x) for x in v)


def _to_key(v: Any) -> Any:
    return tuple(_to_key(x) for x in v) if isinstance(v, list) else v


def _index(tuner: Any, cfg: Any) -> int | None:
    """Position of a picked config in tuner.configs (by identity, else Config equality)."""
    for i, c in enumerate(tuner.configs):
        if c is cfg:
            return i
    for i, c in enumerate(tuner.configs):
        with contextlib.suppress(AttributeError, TypeError):    # not a Config
            if c == cfg:
                return i
    return None


def _read(path: Path) -> dict[str, Any]:
    """The file's tuners section; {} when missing, unreadable or not ours (warned once)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn("read", f"ignoring unreadable {path}: {exc}")
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(
            data.get("tuners"), dict):
        _warn("format", f"ignoring {path}: not a version-{VERSION} autotune cache")
        return {}
    return data["tuners"]


def _entries(section: Any, fp: str) -> list[tuple[tuple, int]]:
    """Valid (key, config index) pairs of one tuner's section, [] when the fingerprint differs."""
    if not isinstance(section, dict) or section.get("fingerprint") != fp:
        return []
    out = []
    for item in section.get("picks") or []:
        if (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
                and type(item[1]) is int):
            out.append((_to_key(item[0]), item[1]))
    return out


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialises read-merge-write across processes (engines warming at once), where flock exists."""
    try:
        import fcntl
    except ImportError:                 # not POSIX: last writer wins, the file stays whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(path: str | os.PathLike | None = None, *, force: bool = False) -> int:
    """Fills every registered tuner's cache from the file; returns how many picks it restored.

    Entries already in a tuner's cache win (they were measured in this process). Off without CUDA
    or under the interpreter unless `force` (tests). Also arranges one save() at exit."""
    global _loaded
    try:
        return _load(path, force)
    finally:
        _loaded = True          # only now: ensure_loaded's unlocked fast path must not run ahead


def _load(path: str | os.PathLike | None, force: bool) -> int:
    global _path, _atexit_registered
    if not (force or _cuda_ok()):
        return 0
    try:
        p = Path(path) if path is not None else cache_path()
    except Exception as exc:  # noqa: BLE001 (an optimisation must never stop the caller)
        _warn("path", f"disabled, no cache path: {exc}")
        return 0
    if p is None:
        return 0
    _path = p
    if not _atexit_registered:
        atexit.register(save)
        _atexit_registered = True
    tuners = _read(p)
    n = 0
    for name, tuner in list(_TUNERS.items()):
        try:
            for key, idx in _entries(tuners.get(name), fingerprint(tuner)):
                if 0 <= idx < len(tuner.configs) and key not in tuner.cache:
                    tuner.cache[key] = tuner.configs[idx]
                    n += 1
        except Exception as exc:  # noqa: BLE001 (an odd key, unhashable…: skip this tuner)
            _warn(f"load:{name}", f"skipping {name}: {exc}")
    return n


def ensure_loaded() -> None:
    """load() once per process; a flag test afterwards, so launch wrappers may call it each time."""
    if _loaded:
        return
    with _lock:
        if not _loaded:
            load()


def save(path: str | os.PathLike | None = None) -> int:
    """Merges the in-memory picks of every registered tuner into the file, atomically (tmp file +
    os.replace); returns how many picks it wrote. A no-op until load() has chosen a file (or a
    path is given). A tuner with no picks leaves its entries in the file as they are."""
    p = Path(path) if path is not None else _path
    if p is None:
        return 0
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with _lock, _file_lock(p):
            tuners = dict(_read(p))
            n, changed = 0, False
            for name, tuner in list(_TUNERS.items()):
                fp = fingerprint(tuner)
                picks: dict[tuple, int] = {}
                for key, cfg in list(tuner.cache.items()):
                    idx = _index(tuner, cfg)
                    if idx is not None and isinstance(key, tuple) and _plain(key):
                        picks[key] = idx
                if not picks:
                    continue
                merged = dict(_entries(tuners.get(name), fp))
                merged.update(picks)
                tuners[name] = {"fingerprint": fp, "picks": [[list(k), i] for k, i in merged.items()]}
                n, changed = n + len(merged), True
            if not changed:
                return 0
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": VERSION, "tuners": tuners}, f, indent=1, sort_keys=True)
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return n
    except Exception as exc:  # noqa: BLE001 (runs at exit too: warn, never raise)
        _warn("save", f"could not write {p}: {exc}")
        return 0
