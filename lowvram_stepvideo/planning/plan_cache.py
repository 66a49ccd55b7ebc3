"""Memory-plan traces kept on disk (cache_home()/plans), so that a dry-run or a run's pre-flight that has traced
the same thing before is arithmetic only: no data-free run of the networks, not even torch's tracing machinery.

An entry is keyed by everything a trace depends on: the planned folder's identity (every file's name, size, mtime
and header, caches.weights_identity), the description of what was traced (profile settings that shape
activations, preset, speed options, parallel layout; plan.trace), this package's source code and torch's
version. The machine is not part of the key: a trace holds activation bytes only, and budgets are applied after.
A missing, unreadable or damaged entry is a miss; a folder that cannot be written is skipped silently (the plan is
only slower). The newest MAX_ENTRIES entries are kept.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..files.caches import cache_home, trim, weights_identity
from ..files.fsutil import atomic_path

MAX_ENTRIES = 256
VERSION = 1            # of the entry format
log = logging.getLogger(__name__)


@functools.cache
def code_version() -> str:
    """The package's source (a code change can change what a trace allocates) and torch's version."""
    h = hashlib.sha256(f"{VERSION}:{torch.__version__}".encode())
    package = Path(__file__).resolve().parent
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def folder_identity(root: Path) -> str:
    """Identity of a model folder's files (a few milliseconds: headers only)."""
    return json.dumps(weights_identity(root), sort_keys=True)


class PlanCache:
    """JSON values on disk under `folder`, keyed by a description string (see the module docstring)."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else cache_home() / "plans"

    def key(self, identity: str, description: str) -> str:
        """`identity`: folder_identity() of the planned folder; `description`: what was traced."""
        return f"{code_version()}|{identity}|{description}"

    def get(self, key: str):
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") == key:
                return entry["value"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    def put(self, key: str, value) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({"key": key, "value": value}))
            trim(self.folder, "*.json", max_files=MAX_ENTRIES)
        except OSError as e:
            log.debug(f"plan cache: cannot write {path}: {e}")

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
