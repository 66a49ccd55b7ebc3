"""Progress of long phases: one kind of bar for the pipeline and quantize, and listeners that see every bar.

    with progress.bar("denoise", total=30) as b:
        for ...:
            b.update()

On a terminal (stderr is a tty with a size) a tqdm bar is drawn; otherwise (a log file, a pipe, a terminal
without a size) a plain line is printed at the start, every few percent, and at the end, so a log gets a readable
record and no carriage returns. Every bar also reports (desc, done, total) to the listeners registered with
`listen(callback)` in the current context (contextvars): a job running in a worker thread registers its own and
sees only its own bars.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Callable, Iterator

Listener = Callable[[str, int, "int | None"], None]   # (desc, done, total)

PLAIN_EVERY_PERCENT = 5       # a plain line each time progress crosses a multiple of this
PLAIN_EVERY_S_UNKNOWN = 10.0  # without a total: a plain line at most this often

_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar("progress_listeners", default=())


@contextlib.contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Call `callback(desc, done, total)` for every bar created and updated inside this block, in this context."""
    token = _listeners.set(_listeners.get() + (callback,))
    try:
        yield
    finally:
        _listeners.reset(token)


def stderr_is_terminal() -> bool:
    """True when stderr is a terminal that reports a usable width (tqdm draws nothing useful otherwise)."""
    stream = sys.stderr
    try:
        if not stream.isatty():
            return False
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Bar:
    """What `bar()` yields: counts progress, draws it, and tells the listeners."""

    def __init__(self, desc: str, total: int | None, unit: str, initial: int, show: bool):
        self.desc, self.total, self.unit, self.done = desc, total, unit, initial
        self._listeners = _listeners.get() if show else ()
        self._start = time.monotonic()
        self._tqdm = _make_tqdm(desc, total, unit, initial) if show and stderr_is_terminal() else None
        self._plain = show and self._tqdm is None
        self._printed_at: tuple[int, float] | None = None   # (percent bucket, time) of the last plain line
        self._emit(force=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        self._emit()

    def set_total(self, total: int) -> None:
        self.total = total
        if self._tqdm is not None:
            self._tqdm.total = total
            self._tqdm.refresh()
        self._emit()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._plain and self._printed_at is not None and self._printed_at[0] != self._bucket():
            self._print_line()

    # ---- plain lines and listeners

    def _emit(self, force: bool = False) -> None:
        for listener in self._listeners:
            listener(self.desc, self.done, self.total)
        if self._plain and (force or self._due()):
            self._print_line()

    def _bucket(self) -> int:
        """The multiple of PLAIN_EVERY_PERCENT reached (done itself without a total)."""
        if not self.total:
            return self.done
        return int(100 * min(self.done, self.total) / self.total) // PLAIN_EVERY_PERCENT

    def _due(self) -> bool:
        if self._printed_at is None:
            return True
        bucket, at = self._printed_at
        if self.total:
            return self._bucket() != bucket
        return time.monotonic() - at >= PLAIN_EVERY_S_UNKNOWN

    def _print_line(self) -> None:
        print(plain_line(self.desc, self.done, self.total, self.unit, time.monotonic() - self._start),
              file=sys.stderr, flush=True)
        self._printed_at = (self._bucket(), time.monotonic())


@contextlib.contextmanager
def bar(desc: str, total: int | None = None, unit: str = "step", *, initial: int = 0,
        show: bool = True) -> Iterator[Bar]:
    """A progress bar over `total` units (None: not known yet, see `Bar.set_total`), starting at `initial`.
    show=False: neither drawn nor reported (e.g. the memory planner's run on fake tensors)."""
    b = Bar(desc, total, unit, initial, show)
    try:
        yield b
    finally:
        b.close()


def plain_line(desc: str, done: int, total: int | None, unit: str, elapsed_s: float) -> str:
    """'denoise: 12/30 steps (40%), 1:02 elapsed, about 1:33 left' (bytes as GB)."""
    count = f"{_amount(done, unit)}/{_amount(total, unit)}" if total else _amount(done, unit)
    text = f"{desc}: {count} {_plural(unit, total or done)}"
    if total:
        text += f" ({100 * min(done, total) // total}%)"
    text += f", {_clock(elapsed_s)} elapsed"
    if total and 0 < done < total:
        text += f", about {_clock(elapsed_s * (total - done) / done)} left"
    return text


def _amount(n: int | None, unit: str) -> str:
    return f"{n / 1e9:.2f}" if unit == "B" else str(n)


def _plural(unit: str, n: int) -> str:
    if unit == "B":
        return "GB"
    return unit if n == 1 or unit.endswith("s") else unit + "s"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _make_tqdm(desc: str, total: int | None, unit: str, initial: int):
    from tqdm import tqdm
    scaled = {"unit_scale": True, "unit_divisor": 1000} if unit == "B" else {}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, **scaled)
