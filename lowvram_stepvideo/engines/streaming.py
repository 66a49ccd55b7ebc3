"""Block streaming: run a stack of identical blocks with only a few of them on the compute device.

`BlockStreamer` attaches to an `nn.ModuleList` from outside (forward pre/post hooks; the model's plain
`for block in blocks` loop is unchanged). `resident` blocks are moved to the device once; every other block's
parameters point at an empty placeholder until its forward, when they are pointed at a device *slot*: one flat
buffer holding one block's bytes, allocated once (a ring of `prefetch + 1` slots). While block i computes, blocks
i+1 .. i+prefetch are copied into free slots on a dedicated CUDA stream; events order copy, compute and reuse.
A slot keeps its block until the slot is needed for another one, so a block still there from the previous forward
(short stacks, `cyclic` prefetch) is not copied again.

With source="ram", streamed blocks live in packed host images (page-locked when CUDA exists) up to
`pin_budget_bytes`, clamped to the RAM the machine has available (`clamp_packed_budget`); the others are "pageable":
read at each forward from the checkpoint's page cache with positioned reads (or from the module's tensors where the
file does not hold them as they run). With source="disk" nothing is packed: every block is read from the checkpoint
files. Unpacked blocks go through a worker thread and, on CUDA, a small pinned staging ring, so reading overlaps
compute. If page-locking fails, the engine logs one warning and carries on with what it got (fewer packed blocks,
pageable staging). On a CPU device the same engine runs with plain buffers and no streams, so its logic is tested
everywhere.

Where streamed blocks live on the host is the store's (block_store.py); attaching to a whole model, with its other
weights, is placement.py's. Host and device bytes an engine holds are `streaming_footprint(...)` of its settings; a
live engine reports its actual allocations with `footprint()`, and the two agree (tests/test_offload_memory.py).
`detach(discard=True)` frees everything and leaves the blocks empty (for a model about to be thrown away);
`detach()` gives the blocks their original tensors back (memory-mapped views where they were loaded as such), never
a second copy next to the arenas.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..profiles import Profile
from . import host_store as offload_store
from .block_store import BlockStore
from .host_store import (
    BlockLayout,
    HostArenas,
    RamSegment,
    available_ram_bytes,
    block_tensors,
    first_line,
    physical_ram_bytes,
    release_cached_pinned_memory,
    size_text)

log = logging.getLogger(__name__)
GiB = 2**30
SOURCES = ("ram", "disk")
PIN_FRACTION = 0.5                    # default pinned budget (source="ram"): this share of physical RAM
ARENA_BYTES = 256 * 2**20             # packed host images come in arenas of this size (a power of two)
STAGING_BYTES, STAGING_BUFFERS = 64 * 2**20, 3                # pinned staging ring for disk/pageable blocks
# RAM left alone when packing at attach: the OS, this process's own allocations (activations on a CPU device,
# decoded frames, Python) and the page cache the disk-streamed blocks read through.
PACKED_RAM_MARGIN = 4 * GiB


class Footprint(NamedTuple):
    device_bytes: int     # weights placed on the device: other weights + resident blocks + slots
    host_bytes: int       # host RAM the engine allocates: packed block images + staging buffers


def packed_budget_bytes(profile: Profile) -> int:
    """The packed-RAM budget of `profile` in bytes (`memory.packed_gb`), as a run asks for it at attach and the plan
    counts it (before `clamp_packed_budget`, which only a run on this machine applies)."""
    return int(profile.memory.packed_gb * GiB)


def clamp_packed_budget(budget_bytes: int, available_bytes: int | None = None) -> int:
    """The packed budget a machine can hold: at most its available RAM minus PACKED_RAM_MARGIN (None = read
    this machine's MemAvailable)."""
    available = available_ram_bytes() if available_bytes is None else available_bytes
    return max(0, min(int(budget_bytes), available - PACKED_RAM_MARGIN))


def streaming_footprint(block_bytes: int, n_blocks: int, other_bytes: int, resident, prefetch: int, source: str,
                        packed_budget_bytes: int, cuda: bool, arena_bytes: int = ARENA_BYTES,
                        staging_bytes: int = STAGING_BYTES, staging_buffers: int = STAGING_BUFFERS) -> Footprint:
    """What attaching a BlockStreamer with these settings holds, without allocating anything.

    block_bytes: `BlockLayout(block).nbytes` (a slot; resident blocks count the same: every tensor rounded to the
    layout's alignment, as a caching allocator rounds it). other_bytes: the model's weights outside the stack (put
    on the device beside it). resident: a count or indices, as BlockStreamer takes. packed_budget_bytes: the budget
    after `clamp_packed_budget`; it applies to source "ram" only. Host bytes that are not allocations of the engine
    (the checkpoint's memory-mapped pages, a model's own loaded tensors) are not included.
    """
    n_resident = len(resident_indices(resident, n_blocks))
    streamed = n_blocks - n_resident
    slots = min(prefetch + 1, streamed)
    arenas = HostArenas(block_bytes, arena_bytes, pin=False)
    packed = arenas.fit(packed_budget_bytes, streamed) if source == "ram" else 0
    host = arenas.cost(packed)
    if packed < streamed and cuda:
        host += staging_buffers * min(staging_bytes, block_bytes)
    return Footprint(other_bytes + (n_resident + slots) * block_bytes, host)


@dataclass
class StreamStats:
    forwards: int = 0
    blocks_fetched: int = 0
    bytes_moved: int = 0              # bytes copied into device slots
    stall_s: float = 0.0              # host time a block's forward waited for a worker-thread fill
    peak_slots_in_use: int = 0        # slots holding a block that is bound or fetched ahead
    slots: int = 0
    slot_bytes: int = 0
    resident_blocks: int = 0
    packed_blocks: int = 0
    pageable_blocks: int = 0
    disk_blocks: int = 0
    packed_bytes: int = 0             # host bytes of packed block images actually allocated
    pin_budget_bytes: int = 0
    page_locked: bool = False         # packed images are page-locked (CUDA) rather than plain RAM


class _Slot:
    """One device buffer able to hold any block of the stack."""

    def __init__(self, layout: BlockLayout, device: torch.device, cuda: bool):
        self.flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        self.views = layout.views(self.flat)
        self.block: int | None = None     # whose bytes are here (or on their way)
        self.job = None                   # Future of a worker-thread fill
        self.stamp = 0                    # fetch order: the oldest unneeded slot is reused first
        self.ready = torch.cuda.Event() if cuda else None   # recorded on the copy stream after the fill
        self.free = torch.cuda.Event() if cuda else None    # recorded on the compute stream after the forward


class BlockStreamer:
    """Stream the blocks of `blocks` through `prefetch + 1` device slots; see the module docstring.

    resident: number of blocks kept on the device (spread evenly, block 0 first) or an iterable of indices.
    weight_refs/prefix: the loaded model's `weight_refs` and the key prefix of this stack (e.g.
    "transformer_blocks."), needed by source="disk". cyclic: after the last block, prefetch the first ones for
    the next forward (for models called in a loop). keep_log: append (event, forward, block) to `log`, event
    one of fetch | evict | bind | release.
    """

    def __init__(self, blocks: nn.ModuleList, device, resident=0, prefetch: int = 1, source: str = "ram",
                 pin_budget_bytes: int | None = None, weight_refs: dict | None = None, prefix: str = "",
                 cyclic: bool = False, keep_log: bool = False, staging_bytes: int = STAGING_BYTES,
                 staging_buffers: int = STAGING_BUFFERS, arena_bytes: int = ARENA_BYTES):
        if source not in SOURCES:
            raise ValueError(f"unknown offload source {source!r}; use one of {', '.join(SOURCES)}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a block count >= 0, got {prefetch!r}")
        self.blocks, self.device = list(blocks), torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resident = resident_indices(resident, len(self.blocks))
        self.prefetch, self.source, self.cyclic = prefetch, source, cyclic
        if pin_budget_bytes is None:
            pin_budget_bytes = int(PIN_FRACTION * physical_ram_bytes())
        self.weight_refs, self.prefix = weight_refs, prefix
        self.staging_bytes, self.staging_buffers, self.arena_bytes = staging_bytes, staging_buffers, arena_bytes
        self.requested_budget_bytes = int(pin_budget_bytes) if source == "ram" else 0
        self.stats = StreamStats()
        self.log: list | None = [] if keep_log else None
        self.other_bytes = 0              # weights outside the stack that the caller put on the device beside it
        self.store: BlockStore | None = None
        self.attached = self.suspended = False
        self._warned = False

    # ------------------------------------------------------------ attach / detach

    def attach(self) -> "BlockStreamer":
        if self.attached:
            raise RuntimeError("this BlockStreamer is already attached")
        if not self.blocks:
            raise ValueError("no blocks to stream")
        self.layout = BlockLayout(self.blocks[0])
        for i, block in enumerate(self.blocks):
            self.layout.check(block, i)
        self._tensors = [[t for _, t in block_tensors(b)] for b in self.blocks]
        self._order = [i for i in range(len(self.blocks)) if i not in self.resident]
        self.store = BlockStore(self._tensors, self.layout, self._order, self.resident, self.source, pin=self.cuda,
                                cuda=self.cuda, weight_refs=self.weight_refs, prefix=self.prefix,
                                arena_bytes=self.arena_bytes, warn=self._warn)
        self._slots, self._staging, self._worker = [], [], None
        try:
            self._fill_store()
        except BaseException:
            self._free_buffers()
            raise
        self._on_device()
        log.info(self.summary())
        return self

    def _on_device(self) -> None:
        """Resident blocks and slots onto the device, streamed blocks parked, hooks on (the store is filled)."""
        try:
            self._move_resident(self.device)
            self._make_slots()          # device allocations: may run out of memory
        except BaseException:
            self.store.restore_resident()
            self._free_buffers()
            self.suspended = False
            raise
        self._placeholders = [torch.empty(0, dtype=e.dtype, device=self.device) for e in self.layout.entries]
        for i in self._order:
            self._park(i)
        self._hooks = [h for i, b in enumerate(self.blocks) for h in self._register(i, b)]
        self._last, self._bound = None, None
        self.attached, self.suspended = True, False

    def _off_device(self) -> None:
        self._stop_copies()
        for h in self._hooks:
            h.remove()
        self._bound = None
        self._slots, self._staging = [], []        # device slots and staging go first

    def suspend(self) -> None:
        """Off the device, the store kept (a model kept between runs): hooks removed, slots and staging freed,
        resident blocks given their host tensors back; the streamed blocks stay parked, their packed copies in the
        arenas, until `resume()` puts it all on the device again without reading or packing anything."""
        if self.attached:
            self._off_device()
            self.store.restore_resident()
            self.attached, self.suspended = False, True

    def resume(self) -> None:
        if not self.suspended:
            raise RuntimeError("this BlockStreamer is not suspended")
        self._on_device()

    def detach(self, discard: bool = False) -> None:
        """Remove the hooks and free every buffer. `discard`: the model is about to be thrown away, so its blocks
        are left empty (nothing is rebuilt or copied back). Otherwise every block gets its original tensors back:
        the memory-mapped views it was loaded with, or, where the originals were copies (cast at load, in-memory
        models), tensors rebuilt one block at a time while the packed arenas are released."""
        if not self.attached and not self.suspended:
            return
        if self.attached:
            self._off_device()
        if discard:
            self._free_buffers()
            empty = [torch.empty(0, dtype=e.dtype) for e in self.layout.entries]
            for tensors in self._tensors:
                for t, placeholder in zip(tensors, empty):
                    t.data = placeholder
        else:
            self.store.restore_resident()
            self.store.restore_streamed()
            self._free_buffers()
        if self.cuda:
            release_cached_pinned_memory()
        self.attached = self.suspended = False

    def _stop_copies(self) -> None:
        for slot in self._slots:
            if slot.job is not None:
                slot.job.exception()      # wait until queued; a failed fill does not matter any more
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _free_buffers(self) -> None:
        self._slots, self._staging = [], []
        if self.store is not None:
            self.store.free()
        self.store = None

    def _register(self, i: int, block: nn.Module) -> list:
        pre = block.register_forward_pre_hook(lambda module, args: self._pre(i))
        post = block.register_forward_hook(lambda module, args, out: self._post(i), always_call=True)
        return [pre, post]

    def _fill_store(self) -> None:
        """The packed budget as this machine can hold it, then the store decides where each block lives."""
        budget = clamp_packed_budget(self.requested_budget_bytes) if self.requested_budget_bytes else 0
        if budget < self.requested_budget_bytes:
            log.info(f"packed budget lowered from {size_text(self.requested_budget_bytes)} to {size_text(budget)}: "
                     f"the available RAM minus {size_text(PACKED_RAM_MARGIN)}")
        self.store.fill(budget)
        s, counts = self.stats, self.store.counts()
        s.pin_budget_bytes, s.resident_blocks = budget, len(self.resident)
        s.packed_blocks, s.pageable_blocks, s.disk_blocks = counts["packed"], counts["pageable"], counts["disk"]
        s.packed_bytes, s.page_locked = self.store.nbytes, self.cuda and s.packed_blocks > 0

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True

    def _move_resident(self, device: torch.device) -> None:
        if not self.cuda:
            return
        for i in self.resident:
            for t in self._tensors[i]:
                t.data = t.data.to(device)

    def _make_slots(self) -> None:
        count = min(self.prefetch + 1, len(self._order))
        self._slots = [_Slot(self.layout, self.device, self.cuda) for _ in range(count)]
        self._slot_of: dict[int, _Slot] = {}
        self._windows = [self._window(i) for i in range(len(self.blocks))]
        self.stats.slots, self.stats.slot_bytes = count, self.layout.nbytes
        staged = any(kind != "packed" for kind in self.store.kind.values())
        reads_files = any(not isinstance(seg, RamSegment) for segs in self.store.segments.values() for seg in segs)
        self._worker = ThreadPoolExecutor(1, "block-stream") if staged and (self.cuda or reads_files) else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        size = min(self.staging_bytes, self.layout.nbytes)
        self._staging = [(self._staging_buffer(size), torch.cuda.Event())
                         for _ in range(self.staging_buffers)] if staged and self.cuda else []
        self._next_staging = 0

    def _staging_buffer(self, size: int) -> torch.Tensor:
        try:
            return offload_store.host_buffer(size, pin=True)
        except RuntimeError as e:
            self._warn(f"could not page-lock {size_text(size)} of staging RAM ({first_line(e)}); staging in pageable "
                       "RAM (copies to the device are not asynchronous)")
            return offload_store.host_buffer(size, pin=False)

    def _window(self, i: int) -> list[int]:
        """Streamed blocks that must be in slots when block i starts: i itself (if streamed), then the next ones."""
        later = [j for j in self._order if j > i]
        if self.cyclic:
            later += [j for j in self._order if j <= i]
        head = [i] if i not in self.resident else []
        ahead = [j for j in later if j != i][:self.prefetch]
        return (head + ahead)[:len(self._slots)]

    def _park(self, i: int) -> None:
        for t, placeholder in zip(self._tensors[i], self._placeholders):
            t.data = placeholder

    # ------------------------------------------------------------ hooks

    def _pre(self, i: int) -> None:
        if self._last is None or i <= self._last:
            self.stats.forwards += 1
        self._last = i
        if self._bound is not None:      # the previous block raised: its post hook released nothing
            self._release()
        window = self._windows[i]
        for j in window:
            self._ensure(j, window)
        self.stats.peak_slots_in_use = max(self.stats.peak_slots_in_use, len(window))
        if i not in self.resident:
            self._bind(i)

    def _post(self, i: int) -> None:
        if self._bound == i:
            self._release()

    def _ensure(self, j: int, window: list[int]) -> None:
        if j in self._slot_of:
            return
        free = [s for s in self._slots if s.block not in window]
        self._fetch(j, min(free, key=lambda s: s.stamp))

    def _fetch(self, j: int, slot: _Slot) -> None:
        if slot.job is not None:         # a fill for a block no longer wanted must end before reuse
            slot.job.exception()
            slot.job = None
        if slot.block is not None:
            del self._slot_of[slot.block]
            self._record("evict", slot.block)
        slot.block, self._slot_of[j] = j, slot
        self.stats.blocks_fetched += 1
        slot.stamp = self.stats.blocks_fetched
        self.stats.bytes_moved += self.layout.nbytes
        self._record("fetch", j)
        if self.store.kind[j] == "packed" and self.cuda:
            self._copy_pinned(j, slot)
        elif self._worker is None:
            self._read_block(j, slot.flat, 0, self.layout.nbytes)
        else:
            slot.job = self._worker.submit(_inference_mode(self._staged_fill if self.cuda else self._cpu_fill), j, slot)

    def _bind(self, i: int) -> None:
        slot = self._slot_of[i]
        if slot.job is not None:
            start = time.perf_counter()
            try:
                slot.job.result()
            except BaseException:
                self._forget(slot)
                raise
            self.stats.stall_s += time.perf_counter() - start
            slot.job = None
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        for t, view in zip(self._tensors[i], slot.views):
            t.data = view
        self._bound = i
        self._record("bind", i)

    def _release(self) -> None:
        i, self._bound = self._bound, None
        self._park(i)
        if self.cuda:
            self._slot_of[i].free.record(torch.cuda.current_stream(self.device))
        self._record("release", i)

    def _forget(self, slot: _Slot) -> None:
        del self._slot_of[slot.block]
        slot.block, slot.job = None, None

    def _record(self, event: str, block: int) -> None:
        if self.log is not None:
            self.log.append((event, self.stats.forwards, block))

    # ------------------------------------------------------------ copies

    def read_block_into(self, index: int, dst: torch.Tensor) -> None:
        """For measurements: the image of streamed block `index` (slot layout, `stats.slot_bytes` bytes) into the
        uint8 CPU tensor `dst`, from wherever that block lives (packed RAM, pageable RAM or disk)."""
        if index not in self.store.kind:
            raise ValueError(f"block {index} is not streamed (resident or out of range)")
        self._read_block(index, dst, 0, self.layout.nbytes)

    def _read_block(self, j: int, dst: torch.Tensor, a: int, b: int) -> None:
        """Host side: bytes [a, b) of block j's image into the host buffer `dst`."""
        self.store.read(j, dst, a, b)

    def _cpu_fill(self, j: int, slot: _Slot) -> None:
        self._read_block(j, slot.flat, 0, self.layout.nbytes)

    def _copy_pinned(self, j: int, slot: _Slot) -> None:
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(slot.free)
            for piece, off in self.store.pieces(j):
                slot.flat[off:off + piece.numel()].copy_(piece, non_blocking=True)
            slot.ready.record(self._copy_stream)

    def _staged_fill(self, j: int, slot: _Slot) -> None:
        """Worker thread, CUDA: file/pageable bytes -> pinned staging chunk -> slot, chunk by chunk."""
        size = self._staging[0][0].numel()
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(slot.free)
            for a in range(0, self.layout.nbytes, size):
                b = min(a + size, self.layout.nbytes)
                buf, done = self._staging[self._next_staging]
                self._next_staging = (self._next_staging + 1) % len(self._staging)
                done.synchronize()           # the previous copy out of this chunk has finished
                self._read_block(j, buf[:b - a], a, b)
                slot.flat[a:b].copy_(buf[:b - a], non_blocking=True)
                done.record(self._copy_stream)
            slot.ready.record(self._copy_stream)

    # ------------------------------------------------------------ reporting

    def footprint(self) -> Footprint:
        """Bytes this attached engine holds, from its own allocations (see `streaming_footprint`)."""
        if not self.attached:
            return Footprint(0, self.store.nbytes if self.suspended else 0)
        block = self.layout.nbytes
        device = self.other_bytes + len(self.resident) * block + sum(s.flat.numel() for s in self._slots)
        host = self.store.nbytes + sum(buf.numel() for buf, _ in self._staging)
        return Footprint(device, host)

    def summary(self) -> str:
        s = self.stats
        streamed = len(self.blocks) - s.resident_blocks
        where = "page-locked" if s.page_locked else "host RAM"
        return (f"block streaming to {self.device}: {len(self.blocks)} blocks, {s.resident_blocks} resident, "
                f"{streamed} streamed ({s.packed_blocks} packed in {where}, {s.pageable_blocks} pageable, "
                f"{s.disk_blocks} from disk), prefetch {self.prefetch}, {s.slots} slots x {size_text(s.slot_bytes)}; "
                f"packed {size_text(s.packed_bytes)} of {size_text(s.pin_budget_bytes)} budget")


def _inference_mode(fn):
    """Worker threads do not inherit the caller's inference mode; slots made under it can only be written there
    (writing ordinary tensors is allowed too)."""
    def run(*args):
        with torch.inference_mode():
            return fn(*args)
    return run


def resident_indices(resident, n: int) -> frozenset[int]:
    """An int r keeps r blocks spread evenly (0, n/r, 2n/r, ...): each gives the copies more time to catch up."""
    if isinstance(resident, int):
        if resident < 0:
            raise ValueError(f"resident must be a block count >= 0, got {resident}")
        r = min(resident, n)
        return frozenset(k * n // r for k in range(r))
    chosen = frozenset(int(i) for i in resident)
    if any(i < 0 or i >= n for i in chosen):
        raise ValueError(f"resident block indices must be in 0..{n - 1}, got {sorted(chosen)}")
    return chosen
