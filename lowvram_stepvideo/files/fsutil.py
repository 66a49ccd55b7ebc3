"""Atomic file writes, placed without replacing what another process wrote, and output names claimed for a run.

Temp files are hidden, end in `.tmp` (so no `*.mp4` or `*.safetensors` listing picks one up as a result) and carry
their owner: a hash of the host name and the process id. A process killed mid-write (SIGKILL, power loss) leaves
its temp file behind; `clean_orphans` removes those whose owner is no longer running, at the next start.

A finished temp file is put in place either over the target (`os.replace`, for files a run owns: its checkpoint,
caches) or only where the name is free: a hard link, which fails when the name is taken, so two writers of one
name can never both succeed (where the file system has no hard links: an exclusive create, then the rename).

A run claims the names it writes for its whole length (`claim`): an exclusive lock on a hidden file next to the
output (`.NAME.lvlock`), which the kernel drops however the process ends. A second run of the same name sees the
claim and picks another name or stops before any work. Where locks are not available (no fcntl, a file system
without them) a claim always succeeds and the placement above still refuses a taken name.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:          # Windows: no advisory locks; placement alone keeps names apart
    fcntl = None

TEMP_MARK = "lvtmp"
LOCK_MARK = "lvlock"
_ORPHAN = re.compile(rf"^\..+\.{TEMP_MARK}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[^/]*\.tmp$")
_LOCK = re.compile(rf"^\.(?P<name>.+)\.{LOCK_MARK}$")
# errors of os.link that mean "this file system has no hard links", not "the name is taken"
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(path: Path) -> str:
    """Prefix of this process's temp files for `path`: `.{name}.lvtmp-{host}-{pid}-`."""
    return f".{Path(path).name}.{TEMP_MARK}-{_host()}-{os.getpid()}-"


def _new_temp(path: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def place(tmp: Path, path: Path, replace: bool = True) -> None:
    """Put the finished temp file `tmp` at `path`. replace: over whatever is there (atomic); else only where the name
    is free, FileExistsError when it is taken (never a replace, even by a writer racing this one)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)   # mkstemp makes 0600; the result should be an ordinary file
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~mask))   # FileExistsError if taken
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@dataclass
class NewFile:
    """A file being written: `tmp` while it is written, then `path`, where it was put (see new_file)."""
    tmp: Path
    path: Path


@contextlib.contextmanager
def new_file(path: Path, suffix: str = "", replace: bool = True,
             next_name: Callable[[Path], Path] | None = None) -> Iterator[NewFile]:
    """Yield a NewFile whose temp path (next to `path`) the caller writes; on success it is placed (see place) and
    `.path` says where: with replace=False and the name taken, at `next_name(path)` (and so on) when given, else
    FileExistsError. On any error the temp file is removed. The temp name ends in `suffix` + `.tmp` (writers that
    pick a format by extension must be told the format)."""
    path = Path(path)
    out = NewFile(_new_temp(path, suffix), path)
    try:
        yield out
        while True:
            try:
                place(out.tmp, out.path, replace)
                return
            except FileExistsError:
                if next_name is None:
                    raise
                out.path = next_name(out.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(out.tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "", replace: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it becomes `path` (see new_file), on error it is removed."""
    with new_file(path, suffix, replace) as f:
        yield f.tmp


# ---- claims ------------------------------------------------------------------------------------------------------

def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{LOCK_MARK}")


class Claim:
    """This process's hold on an output name (see claim); `release()` when the run ends (the kernel releases it
    when the process dies)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = Path(path), fd

    @property
    def locked(self) -> bool:
        """False where locks are not available (see the module docstring)."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(lock_path(self.path))   # still locked: a process that opened it now sees another file
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None


def claim(path: Path) -> Claim | None:
    """Claim `path` for this run, or None when another running process holds it (see holder)."""
    if fcntl is None:
        return Claim(path, None)
    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:          # a folder where nothing can be created: the write will say so
            return Claim(path, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            with contextlib.suppress(OSError):   # no locks on this file system: placement still refuses
                os.unlink(lock)
            return Claim(path, None)
        if _same_file(fd, lock):   # not unlinked by its last holder between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return Claim(path, fd)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def holder(path: Path) -> str:
    """Who holds the claim on `path`, for a message: 'process N' or 'another process'."""
    try:
        pid = int(lock_path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "another process"
    return f"process {pid}"


# ---- leftovers ---------------------------------------------------------------------------------------------------

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
    """Remove the temp files in `folder` left by processes of this host that are gone, and claim files nobody
    holds; returns what was removed. Files of running processes and of other hosts (a shared folder) are left
    alone."""
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
        lock = _LOCK.match(entry.name)
        if lock and fcntl is not None:
            held = claim(Path(folder) / lock["name"])
            if held is not None and held.locked:   # nobody held it: left by a killed run
                held.release()
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
