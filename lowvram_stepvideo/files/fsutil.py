"""Atomic file writes: a temp file in the destination's folder, renamed over the target only when complete.

Temp files are hidden, end in `.tmp` (so no `*.mp4` or `*.safetensors` listing picks one up as a result) and carry
their owner: a hash of the host name and the process id. A process killed mid-write (SIGKILL, power loss) leaves
its temp file behind; `clean_orphans` removes those whose owner is no longer running, at the next start.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path

TEMP_MARK = "lvtmp"
_ORPHAN = re.compile(rf"^\..+\.{TEMP_MARK}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[^/]*\.tmp$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(path: Path) -> str:
    """Prefix of this process's temp files for `path`: `.{name}.lvtmp-{host}-{pid}-`."""
    return f".{Path(path).name}.{TEMP_MARK}-{_host()}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed. The temp name
    ends in `suffix` + `.tmp` (writers that pick a format by extension must be told the format)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=f"{suffix}.tmp", dir=path.parent)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    except OSError:
        return True
    return True


def clean_orphans(folder: Path) -> list[Path]:
    """Remove the temp files in `folder` left by processes of this host that are gone; returns what was removed.
    Files of running processes and of other hosts (a shared folder) are left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _ORPHAN.match(entry.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def files_under(folder: Path) -> list[Path]:
    """Every file under `folder`, through symlinked folders too; hidden ones (temp files) and dangling links are
    left out."""
    out = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(top) / f for f in files if not f.startswith(".") and os.path.isfile(os.path.join(top, f))]
    return out


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
