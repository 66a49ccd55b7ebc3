"""The one way a mechanism attaches to a module and comes off again.

A mechanism (block streaming, the attention kernel, fast matmuls, the step cache, compile, parallel splits...)
changes a module from outside: attributes set on it or on its submodules, hooks, weights moved. It does so inside
`attaching(module, mechanism)`, through the `Handle` that gives: `set` (an attribute), `hook` (a removable hook),
`on_detach` (an undo of its own, e.g. weights given back). `Handle.detach()` undoes every change in reverse order,
so the module is as it was before: an attribute it held gets its old value back, one it did not hold is deleted.
A failure inside `attaching` undoes what was done so far.

The rules between mechanisms are here, not in comments at the call sites. They apply to a module and every module
inside it or around it (e.g. compile on the DiT's block list and expanded weights on the DiT):
- a mechanism is attached once;
- `ORDER`: (first, then) must go on in that order when both are used; attaching `first` while `then` is on raises;
- `EXCLUSIVE`: pairs that never go on together;
- handles come off in the reverse order they went on: detaching one while a later one is still on raises (the
  later one may have built on it: sequence parallel wraps the attention kernel), except with `detach_all`;
- detaching a handle that is already off does nothing (a cleanup path may run after an earlier detach).
Compile has no order of its own: it traces at the first call, and a kernel swapped after that retraces.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

from torch import nn

MECHANISMS = ("placement", "streaming", "attention", "expanded_weights", "matmul", "step_cache", "compile",
              "sequence_parallel", "cfg_parallel")
ORDER = {
    ("attention", "sequence_parallel"):
        "sequence parallel's all-to-all wraps the attention kernel; a kernel attached after it would replace it",
}
EXCLUSIVE = {
    ("placement", "streaming"): "both put the weights on the device",
    ("expanded_weights", "compile"): "hooks inside a compiled block are guarded per block (a recompile for each)",
}
_SLOT = "_lowvram_attached"           # a module's handles, in the order they went on (absent when none)
_MISSING = object()
_ROOTS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()   # modules with handles on them
_counter = 0


class AttachError(RuntimeError):
    """A mechanism attached or detached against the rules above."""


class Handle:
    """One mechanism on one module: what it changed, to undo. `value`: what the mechanism reports (the
    attention kernel's name, the fast matmul's call counter, the block streamer)."""

    def __init__(self, module: nn.Module, mechanism: str):
        global _counter
        _counter += 1
        self.module, self.mechanism, self.order = module, mechanism, _counter
        self.value = None
        self.attached = True
        self._undo: list[Callable[[bool], None]] = []

    def set(self, obj, name: str, value) -> None:
        """obj.name = value, undone on detach. Plain attributes only (not parameters, buffers or submodules)."""
        if isinstance(obj, nn.Module) and any(name in d for d in (obj._parameters, obj._buffers, obj._modules)):
            raise AttachError(f"{self.mechanism}: {type(obj).__name__}.{name} is a parameter, buffer or submodule")
        before = vars(obj).get(name, _MISSING)     # the instance's own value, not its class's
        setattr(obj, name, value)
        self._undo.append(lambda discard: _restore(obj, name, before))

    def hook(self, removable) -> None:
        """A hook handle (anything with .remove()), removed on detach."""
        self._undo.append(lambda discard: removable.remove())

    def on_detach(self, undo: Callable[[bool], None]) -> None:
        """undo(discard) runs on detach, in reverse order with the other changes."""
        self._undo.append(undo)

    def detach(self, discard: bool = False) -> None:
        """Undo every change. `discard`: the module is about to be thrown away; a mechanism may then drop what it
        holds instead of giving it back (streaming leaves the weights empty)."""
        if not self.attached:
            return
        later = [h for h in _related(self.module) if h.order > self.order]
        if later:
            raise AttachError(f"{self.mechanism} cannot come off before {later[-1].mechanism}, attached after it; "
                              f"detach {later[-1].mechanism} first")
        self._run_undo(discard)

    def _run_undo(self, discard: bool) -> None:
        errors = []
        for undo in reversed(self._undo):
            try:
                undo(discard)
            except BaseException as e:     # undo the rest anyway; the first error is raised after
                errors.append(e)
        self._undo, self.attached = [], False
        _unregister(self)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"<{self.mechanism} on {type(self.module).__name__}{'' if self.attached else ', detached'}>"


class Attachments:
    """Handles (or other Attachments) that go on together and come off together, last first. As a context
    manager: an exception inside takes off what went on so far."""

    def __init__(self):
        self.handles: list = []

    def add(self, handle):
        self.handles.append(handle)
        return handle

    def detach(self, discard: bool = False) -> None:
        while self.handles:
            self.handles.pop().detach(discard)

    def __enter__(self) -> "Attachments":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is not None:
            self.detach()


@contextlib.contextmanager
def attaching(module: nn.Module, mechanism: str):
    """A new handle for `mechanism` on `module` after checking the rules; an exception inside undoes it."""
    _check(module, mechanism)
    handle = Handle(module, mechanism)
    _register(handle)
    try:
        yield handle
    except BaseException:
        handle._run_undo(discard=False)
        raise


def attached(module: nn.Module) -> list[str]:
    """The mechanisms on `module` or on the modules inside or around it, in the order they went on."""
    return [h.mechanism for h in _related(module)]


def handle_of(module: nn.Module, mechanism: str) -> Handle | None:
    """The handle of `mechanism` attached to `module` itself, if any."""
    return next((h for h in vars(module).get(_SLOT, ()) if h.mechanism == mechanism), None)


def detach_all(module: nn.Module, discard: bool = False) -> None:
    """Take off every mechanism on `module` and inside it, last first."""
    for handle in sorted(_inside(module), key=lambda h: h.order, reverse=True):
        handle._run_undo(discard)


def _check(module: nn.Module, mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise AttachError(f"unknown mechanism {mechanism!r}; one of {', '.join(MECHANISMS)}")
    on = {h.mechanism for h in _related(module)}
    if mechanism in on:
        raise AttachError(f"{mechanism} is already attached to this {type(module).__name__}; detach it first")
    for (first, then), why in ORDER.items():
        if mechanism == first and then in on:
            raise AttachError(f"{first} must be attached before {then} ({why}); detach {then} first")
    for pair, why in EXCLUSIVE.items():
        if mechanism in pair and (other := pair[1 - pair.index(mechanism)]) in on:
            raise AttachError(f"{mechanism} does not go with {other} ({why}); detach {other} first")


def _related(module: nn.Module) -> list[Handle]:
    """Handles on `module`, on modules inside it and on modules that contain it, in the order they went on."""
    found = list(_inside(module))
    for root in list(_ROOTS):
        if root is not module and any(m is module for m in root.modules()):
            found += vars(root).get(_SLOT, [])
    return sorted(found, key=lambda h: h.order)


def _inside(module: nn.Module) -> list[Handle]:
    return [h for m in module.modules() for h in vars(m).get(_SLOT, ())]


def _register(handle: Handle) -> None:
    vars(handle.module).setdefault(_SLOT, []).append(handle)
    _ROOTS.add(handle.module)


def _unregister(handle: Handle) -> None:
    handles = vars(handle.module).get(_SLOT, [])
    if handle in handles:
        handles.remove(handle)
    if not handles:
        vars(handle.module).pop(_SLOT, None)
        _ROOTS.discard(handle.module)


def _restore(obj, name: str, before) -> None:
    if before is _MISSING:
        vars(obj).pop(name, None)
    else:
        setattr(obj, name, before)
