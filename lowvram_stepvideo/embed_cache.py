"""Cache of text embeddings keyed by the text encoders' identity and the exact prompt strings.

The 19.6B step_llm is the slowest thing to bring onto a small card; a prompt seen before skips it entirely.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fsutil import atomic_path

Embeds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # y (B,S,D), y_mask (B,77+S), clip (B,77,Dc)


def default_cache_dir() -> Path:
    base = os.environ.get("LOWVRAM_STEPVIDEO_CACHE") or os.path.join(Path.home(), ".cache", "lowvram-stepvideo")
    return Path(base) / "embeddings"


def model_identity(files: list[Path]) -> str:
    """Names, sizes and headers (first 64 KiB) of the encoder files: changes whenever the weights do."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
    return h.hexdigest()[:16]


class EmbeddingCache:
    def __init__(self, identity: str, folder: Path | None = None):
        self.identity, self.folder = identity, Path(folder or default_cache_dir())

    def _path(self, prompts: list[str]) -> Path:
        key = json.dumps([self.identity, prompts], ensure_ascii=False).encode()
        return self.folder / f"{hashlib.sha256(key).hexdigest()[:32]}.safetensors"

    def get(self, prompts: list[str]) -> Embeds | None:
        path = self._path(prompts)
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            return t["y"], t["y_mask"], t["clip"]
        except Exception:  # a damaged cache entry is only a miss
            return None

    def put(self, prompts: list[str], embeds: Embeds) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        y, mask, clip = (t.detach().cpu().contiguous() for t in embeds)
        with atomic_path(self._path(prompts), ".safetensors") as tmp:
            save_file({"y": y, "y_mask": mask, "clip": clip}, str(tmp))
