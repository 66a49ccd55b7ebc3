"""Atomic file writes: a temp file in the destination's folder, renamed over the target only when complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)   # mkstemp makes 0600; the result should be an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def writable_dir_error(path: Path) -> str | None:
    """One-line reason why `path` cannot be written, or None."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        return f"cannot write {path}: folder {parent} does not exist (create it or choose another --output)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path}: no write permission in {parent} (choose another --output)"
    if Path(path).is_dir():
        return f"cannot write {path}: it is a folder (give a file name ending in .mp4)"
    return None
