"""Cache of text embeddings keyed by the text encoders' identity and the exact prompt strings.

The 19.6B step_llm is the slowest thing to bring onto a small card; a prompt seen before skips it entirely.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .caches import CACHE_ENV, cache_home, trim
from .fsutil import atomic_path, clean_orphans

Embeds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # y (B,S,D), y_mask (B,77+S), clip (B,77,Dc)
MAX_BYTES = 2 * 2**30   # the entries used last within this size are kept (a full-size one is ~8 MB: ~250 prompts)
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_home() / "embeddings"


class EmbeddingCache:
    """`widths`: (step_llm width, CLIP width) the entries must have; an entry that does not fit is a miss."""

    def __init__(self, identity: str, folder: Path | None = None, widths: tuple[int, int] | None = None):
        self.identity, self.folder, self.widths = identity, Path(folder or default_cache_dir()), widths

    def _path(self, prompts: list[str]) -> Path:
        key = json.dumps([self.identity, prompts], ensure_ascii=False).encode()
        return self.folder / f"{hashlib.sha256(key).hexdigest()[:32]}.safetensors"

    def get(self, prompts: list[str]) -> Embeds | None:
        path = self._path(prompts)
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            embeds = t["y"], t["y_mask"], t["clip"]
        except Exception:  # a damaged cache entry is only a miss
            return None
        problem = self.problem(embeds, len(prompts))
        if problem:
            log.warning(f"warning: ignoring the cached text embeddings {path.name} ({problem}); computing them again")
            return None
        try:
            os.utime(path)          # used now: the last to go when the cache is trimmed
        except OSError:
            pass
        return embeds

    def problem(self, embeds: Embeds, batch: int) -> str | None:
        """Why cached embeddings cannot be used for `batch` prompts, or None."""
        y, mask, clip = embeds
        if y.dim() != 3 or clip.dim() != 3 or mask.dim() != 2:
            return f"shapes {tuple(y.shape)}, {tuple(mask.shape)}, {tuple(clip.shape)}"
        if not (y.is_floating_point() and clip.is_floating_point()) or mask.is_floating_point():
            return f"dtypes {y.dtype}, {mask.dtype}, {clip.dtype}"
        if {y.shape[0], mask.shape[0], clip.shape[0]} != {batch}:
            return f"batch {y.shape[0]}/{mask.shape[0]}/{clip.shape[0]}, expected {batch}"
        if mask.shape[1] != clip.shape[1] + y.shape[1]:
            return f"mask of {mask.shape[1]} tokens for {clip.shape[1]} + {y.shape[1]}"
        if self.widths and (y.shape[2], clip.shape[2]) != tuple(self.widths):
            return f"widths {y.shape[2]}, {clip.shape[2]}, expected {self.widths[0]}, {self.widths[1]}"
        if not (torch.isfinite(y).all() and torch.isfinite(clip).all()):
            return "NaN or inf values"
        return None

    def put(self, prompts: list[str], embeds: Embeds) -> None:
        """Store the embeddings; a cache that cannot be written (full disk, read-only folder) is only a warning,
        the run that computed them goes on."""
        y, mask, clip = (t.detach().cpu().contiguous() for t in embeds)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            clean_orphans(self.folder)   # temp files of runs that were killed while storing an entry
            with atomic_path(self._path(prompts), ".safetensors") as tmp:
                save_file({"y": y, "y_mask": mask, "clip": clip}, str(tmp))
            trim(self.folder, "*.safetensors", max_bytes=MAX_BYTES)   # it would grow with every prompt
        except OSError as e:
            log.warning(f"warning: text embeddings not cached ({e.strerror or e}: {self.folder}); "
                        f"set {CACHE_ENV} to a writable folder or use --no-text-cache")
