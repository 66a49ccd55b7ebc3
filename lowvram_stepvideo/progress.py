"""Progress bars that also report to listeners (minimal version; branch `polish` owns the full one).

`bar(desc, total, unit)` draws a tqdm bar on stderr and reports `(desc, done, total)` to every callback registered
with `listen(callback)` in the current context (contextvars: a job in a worker thread has its own listeners).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Callable

Listener = Callable[[str, int, "int | None"], None]
_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar("progress_listeners", default=())


@contextlib.contextmanager
def listen(callback: Listener):
    """Report every bar created inside the block to `callback(desc, done, total)`."""
    token = _listeners.set(_listeners.get() + (callback,))
    try:
        yield
    finally:
        _listeners.reset(token)


class Bar:
    def __init__(self, desc: str, total: int | None, unit: str):
        from tqdm import tqdm
        self.desc, self.total, self.done = desc, total, 0
        self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
        self._listeners = _listeners.get()
        self._report()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._tqdm.update(n)
        self._report()

    def set_total(self, total: int) -> None:
        self.total = self._tqdm.total = total
        self._tqdm.refresh()
        self._report()

    def _report(self) -> None:
        for callback in self._listeners:
            callback(self.desc, self.done, self.total)

    def close(self) -> None:
        self._tqdm.close()


@contextlib.contextmanager
def bar(desc: str, total: int | None = None, unit: str = "step"):
    b = Bar(desc, total, unit)
    try:
        yield b
    finally:
        b.close()
