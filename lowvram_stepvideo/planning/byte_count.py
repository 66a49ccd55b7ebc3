"""Byte accounting of live tensors per device, used three ways:

- the memory plan (`--dry-run`): the real pipeline runs on data-free "meta" tensors, so nothing is allocated and
  every op only produces shapes; `PlanningAccountant` adds up the bytes of the tensors that are alive on the
  compute device and in host RAM and keeps the peak;
- an injected memory limit (tests of the OOM fallback on CPU): real tensors, and an allocation that would take a
  device past its limit raises torch.OutOfMemoryError exactly where a GPU would;
- phase reports (what is in use when a phase ends).

Only tensors produced by operators while the mode is active are counted; weights that exist before are added by
the caller (it knows what it placed where).
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..engines.host_store import pinned_bytes

GiB = 2**30


class ByteAccountant(TorchDispatchMode):
    """Live and peak bytes per device type of every storage created by an operator under this mode."""

    def __init__(self, limits: dict[str, int] | None = None):
        super().__init__()
        self.limits = dict(limits or {})
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.base: dict[str, int] = defaultdict(int)   # bytes placed before (weights), added by the caller
        self.made: dict[str, int] = defaultdict(int)   # storages made so far: a clock of the work done there
        self._storages: dict[int, list] = {}          # storage id -> [device, nbytes, tensor refcount]
        self._paused = False

    def add_base(self, device: str, nbytes: int) -> None:
        self.base[device] += nbytes
        self._update_peak(device)

    def total(self, device: str) -> int:
        return self.base[device] + self.live[device]

    @contextlib.contextmanager
    def untracked(self):
        """Ops in this block allocate nothing the plan should count (e.g. stand-ins for file-backed weights)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def reset_peak(self) -> None:
        for dev in set(self.peak) | set(self.live):
            self.peak[dev] = self.total(dev)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not self._view_of_untracked(t, args):
                self._track(t, t.device.type)
        return out

    def _view_of_untracked(self, t: torch.Tensor, args) -> bool:
        """A view (or in-place result) of an input whose storage is not counted (a weight placed before): no new
        bytes. (`F.linear` on the CPU is a transposed view of the weight and a matmul.)"""
        key = t.untyped_storage()._cdata
        if key in self._storages:
            return False
        return any(isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == key for a in tree_flatten(args)[0])

    def measure(self) -> "PeakWatch":
        """A block's own peak above what was live when it started, per device (the running peak is kept)."""
        return PeakWatch(self)

    def note_transient(self, device: str, nbytes: int) -> None:
        """Something held `nbytes` on `device` for a moment, on top of what is live now (see PeakWatch)."""
        self.peak[device] = max(self.peak[device], self.total(device) + nbytes)

    def _track(self, t: torch.Tensor, dev: str, nbytes: int | None = None) -> None:
        """Count `t`'s storage (once, however many tensors share it) as `nbytes` (default: its size) on `dev`."""
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            nbytes = storage.nbytes() if nbytes is None else nbytes
            self._check_limit(dev, nbytes)
            entry = self._storages[key] = [dev, nbytes, 0]
            self.live[dev] += nbytes
            self.made[dev] += 1
            self._update_peak(dev)
        entry[2] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            self.live[entry[0]] -= entry[1]
            del self._storages[key]

    def _update_peak(self, dev: str) -> None:
        self.peak[dev] = max(self.peak[dev], self.total(dev))

    def _check_limit(self, dev: str, nbytes: int) -> None:
        limit = self.limits.get(dev)
        if limit is not None and self.total(dev) + nbytes > limit:
            raise torch.OutOfMemoryError(
                f"injected limit: tried to allocate {fmt_bytes(nbytes)} on {dev}, "
                f"{fmt_bytes(self.total(dev))} of {fmt_bytes(limit)} in use")


class PeakWatch:
    """`with acc.measure() as watch:` ... then `watch.extra[device]`: the most the block held at once on each
    device beyond what was live when it began. The accountant's running peak is kept across the block."""

    def __init__(self, acc: ByteAccountant):
        self.acc = acc
        self.extra: dict[str, int] = {}

    def __enter__(self) -> "PeakWatch":
        acc = self.acc
        self._devices = set(acc.peak) | set(acc.live) | set(acc.base)
        self._outer = {dev: acc.peak[dev] for dev in self._devices}
        self._start = {dev: acc.total(dev) for dev in self._devices}
        acc.reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        acc = self.acc
        for dev in self._devices | set(acc.peak):
            self.extra[dev] = acc.peak[dev] - self._start.get(dev, 0)
            acc.peak[dev] = max(acc.peak[dev], self._outer.get(dev, 0))


HOST, DEVICE = "cpu", "meta"      # what PlanningAccountant counts bytes under: host RAM, the compute device


class PlanningAccountant(ByteAccountant):
    """Byte accounting for a run on data-free tensors (the memory plan).

    Every tensor is a "meta" tensor; each storage is counted either under HOST (made on the CPU, or moved there:
    what the run would hold in host RAM) or under DEVICE (made on or moved to the compute device). The run's
    compute device must be "meta" with an index (`torch.device("meta", 0)`), so that `x.to(device)` reaches this
    mode as a copy, like an upload, instead of returning x. Real CPU tensors that enter an op (token ids) are
    replaced by meta stand-ins; a move to where a tensor already is aliases it, as on a real device. A page-locked
    allocation (`pin_memory=True`) counts what the pinned allocator takes for it (host_store.pinned_bytes). Ops
    that need data (`.item()`, boolean indexing) fail: the plan cannot follow them."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False   # nothing here runs under torch.compile: do not wrap the handler in dynamo's guard

    def __init__(self):
        super().__init__()
        self._labels: dict[int, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        args, kwargs = list(args), dict(kwargs or {})
        pinned = bool(kwargs.pop("pin_memory", None))
        if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy):
            label, out = self._move(func, args, kwargs)
        else:
            label = _target(_argument(func, args, kwargs, "device"), _is_factory(func)) or self._inherit(args)
            _set_argument(func, args, kwargs, "device", torch.device(DEVICE))
            if "generator" in kwargs:
                kwargs["generator"] = None                     # a CPU generator cannot draw meta tensors
            out = func(*[_as_meta(a) for a in args], **kwargs)
        if not self._paused:
            for t in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not self._view_of_untracked(t, args):
                    nbytes = pinned_bytes(t.untyped_storage().nbytes()) if pinned else None
                    self._track(t, self._labels.setdefault(t.untyped_storage()._cdata, label), nbytes)
        return out

    def _move(self, func, args: list, kwargs: dict) -> tuple[str, torch.Tensor]:
        """`.to(...)` / `.cpu()`: a copy to where the arguments say, or the tensor itself when it is there."""
        src = args[0]
        other = _argument(func, args, kwargs, "other")
        device = (None if other is None else other.device) or _argument(func, args, kwargs, "device")
        dtype = (None if other is None else other.dtype) or _argument(func, args, kwargs, "dtype") or src.dtype
        label = _target(device, False) if other is None else self.label(other)
        label = label or self.label(src)
        if label == self.label(src) and dtype == src.dtype:
            return label, torch.ops.aten.alias.default(src)
        return label, torch.ops.aten._to_copy.default(_as_meta(src), dtype=dtype, device=torch.device(DEVICE))

    def _inherit(self, args: list) -> str:
        """DEVICE if any tensor argument is there (weights, not tracked, are), HOST if all are in host RAM."""
        seen = False
        for a in args:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor):
                    if self.label(t) == DEVICE:
                        return DEVICE
                    seen = True
        return HOST if seen else DEVICE

    def label(self, t: torch.Tensor) -> str:
        """HOST or DEVICE: where `t` counts."""
        if t.device.type == "cpu":
            return HOST
        return self._labels.get(t.untyped_storage()._cdata, DEVICE)

    def _release(self, key: int) -> None:
        super()._release(key)
        if key not in self._storages:
            self._labels.pop(key, None)


def _target(device, factory: bool) -> str | None:
    """Where an op puts its result: HOST or DEVICE, None when it follows its inputs (`empty_like`, `.to(dtype)`)."""
    if device is not None:
        return HOST if torch.device(device).type == "cpu" else DEVICE
    return HOST if factory else None                  # a factory without a device: the default, the CPU


@functools.cache
def _is_factory(func) -> bool:
    """An op that makes a tensor from sizes alone (empty, zeros, randn, arange...)."""
    arguments = func._schema.arguments
    return any(a.name == "device" for a in arguments) and not any("Tensor" in str(a.type) for a in arguments)


@functools.cache
def _position(func, name: str) -> int | None:
    return next((i for i, a in enumerate(func._schema.arguments) if a.name == name), None)


def _argument(func, args: list, kwargs: dict, name: str):
    i = _position(func, name)
    return args[i] if i is not None and i < len(args) else kwargs.get(name)


def _set_argument(func, args: list, kwargs: dict, name: str, value) -> None:
    i = _position(func, name)
    if i is not None and i < len(args):
        args[i] = value
    elif name in kwargs:
        kwargs[name] = value


def _as_meta(a):
    """A real CPU tensor argument (or list of them) replaced by a data-free one; anything else as it is."""
    if isinstance(a, torch.Tensor):
        return a if a.device.type == "meta" else torch.empty_strided(a.size(), a.stride(), dtype=a.dtype,
                                                                     device="meta")
    if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
        return type(a)(_as_meta(t) for t in a)
    return a


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"
