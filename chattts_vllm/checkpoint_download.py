"""Fetching the official `asset/` folder from the Hugging Face Hub.

Only the files inference needs (about 1.2 GB), into the usual hub cache so a second call, or an
offline machine that already has them, reuses them. A missing network fails within seconds with a
message that says how to proceed without the hub.
"""
from __future__ import annotations

from pathlib import Path

from chattts_vllm.checkpoint import ASSET_FILES

ALLOW_PATTERNS = [f"asset/{name}" for name in ASSET_FILES] + [
    "asset/tokenizer/*.json",
    "asset/spk_stat.pt",  # legacy speaker statistics: the prior of random and named voices
]


class DownloadError(RuntimeError):
    """The hub could not be reached, or the repository lacks the ChatTTS asset files."""


def fetch_asset(repo_id: str = "2Noise/ChatTTS", *, revision: str | None = None,
                cache_dir: str | Path | None = None, endpoint: str | None = None,
                progress: bool = True, etag_timeout: float = 10.0) -> Path:
    """Download (or find in the cache) the `asset/` files; returns the local `asset/` folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if not progress:
        disable_progress_bars()
    try:
        root = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 endpoint=endpoint, allow_patterns=ALLOW_PATTERNS,
                                 etag_timeout=etag_timeout)
    except Exception as e:  # connection, DNS, timeout, 401/404: all end the same way for a user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(
            f"could not download {where} from the Hugging Face Hub: {type(e).__name__}: {reason}\n"
            "Check the network (HF_ENDPOINT, HTTPS_PROXY, HF_TOKEN), or copy the repository's "
            "asset/ folder here by other means and run: chattts-vllm convert ASSET_DIR OUT_DIR"
        ) from e
    finally:
        if not progress:
            enable_progress_bars()
    asset = Path(root) / "asset"
    missing = [name for name in ASSET_FILES if not (asset / name).is_file()]
    if missing:
        raise DownloadError(f"{where} has no ChatTTS asset files: missing {', '.join(missing)}")
    return asset
