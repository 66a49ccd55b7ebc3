"""Where the project's caches live (the demo model, text embeddings, memory plans) and what identifies the files
a cache entry was made from.

The folder is $LOWVRAM_STEPVIDEO_CACHE, else $XDG_CACHE_HOME/lowvram-stepvideo, else ~/.cache/lowvram-stepvideo.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .fsutil import files_under

CACHE_ENV = "LOWVRAM_STEPVIDEO_CACHE"
COMPONENTS = ("transformer", "step_llm", "hunyuan_clip", "vae")


def cache_home() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowvram-stepvideo")
    return Path(base)


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
