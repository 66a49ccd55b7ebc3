"""Byte accounting of live tensors per device, used three ways:

- the memory plan (`--dry-run`): the real pipeline runs under FakeTensorMode with the compute device replaced by
  "meta", so nothing is allocated and every op only produces shapes; this mode adds up the bytes of the tensors
  that are alive on each device and keeps the peak;
- an injected memory limit (tests of the OOM fallback on CPU): real tensors, and an allocation that would take a
  device past its limit raises torch.OutOfMemoryError exactly where a GPU would;
- phase reports (what is in use when a phase ends).

Only tensors produced by operators while the mode is active are counted; weights that exist before are added by
the caller (it knows what it placed where).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2**30


class ByteAccountant(TorchDispatchMode):
    """Live and peak bytes per device type of every storage created by an operator under this mode."""

    def __init__(self, limits: dict[str, int] | None = None):
        super().__init__()
        self.limits = dict(limits or {})
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.base: dict[str, int] = defaultdict(int)   # bytes placed before (weights), added by the caller
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
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, dev = storage._cdata, t.device.type
        entry = self._storages.get(key)
        if entry is None:
            self._check_limit(dev, storage.nbytes())
            entry = self._storages[key] = [dev, storage.nbytes(), 0]
            self.live[dev] += entry[1]
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


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"
