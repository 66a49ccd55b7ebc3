"""Where the project's caches live (the demo model, text embeddings, memory plans) and what identifies the files
a cache entry was made from.

The folder is $LOWVRAM_STEPVIDEO_CACHE, else $XDG_CACHE_HOME/lowvram-stepvideo, else ~/.cache/lowvram-stepvideo.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from .fsutil import files_under

CACHE_ENV = "LOWVRAM_STEPVIDEO_CACHE"
COMPONENTS = ("transformer", "step_llm", "hunyuan_clip", "vae")


def cache_home() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowvram-stepvideo")
    return Path(base)


def read_cache_json(path: Path) -> dict:
    """A cache file's JSON object; {} when it is missing, unreadable or not an object (the cache is rebuilt)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_identity(files: list[Path]) -> str:
    """Names, sizes, modification times and headers (first 64 KiB) of `files`: changes whenever the weights do
    (a fine-tune of the same layout has the same names, sizes and header, but not the same mtime)."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
    return h.hexdigest()[:16]


def weights_identity(root: Path, components: tuple[str, ...] = COMPONENTS) -> dict[str, str]:
    """Per component folder, the identity of every file in it (weights, configs, tokenizers)."""
    return {name: model_identity(files_under(Path(root) / name)) for name in components}


def trim(folder: Path, pattern: str, max_files: int | None = None, max_bytes: int | None = None) -> None:
    """Delete the files of `folder` matching `pattern` that were modified longest ago, beyond the newest
    `max_files` or the newest within `max_bytes` (a cache entry's mtime is its last use where the cache says so).
    Files another process removes meanwhile are skipped."""
    entries = []
    for f in Path(folder).glob(pattern):
        with contextlib.suppress(OSError):
            st = f.stat()
            entries.append((st.st_mtime_ns, st.st_size, f))
    kept = 0
    for count, (_, size, f) in enumerate(sorted(entries, key=lambda e: e[0], reverse=True), start=1):
        kept += size
        if (max_files is not None and count > max_files) or (max_bytes is not None and kept > max_bytes):
            with contextlib.suppress(OSError):
                f.unlink()
