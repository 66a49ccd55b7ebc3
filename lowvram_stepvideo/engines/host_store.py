"""Where the weights of a streamed block live, and how their bytes get into a flat buffer.

Every block of a stack has the same tensors (names, dtypes, shapes), so one `BlockLayout` places them at fixed
byte offsets in a flat uint8 buffer: a device slot, a packed host copy or a staging chunk all share it. A block's
bytes come from `Segment`s (one per tensor): a host tensor, a byte range of a checkpoint file, or a file range that
must be cast to the run dtype. Files are read with `os.preadv` into the destination buffer, never through the
memory map, so reading from disk adds nothing to the process's resident memory beyond the buffers themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..files.weights import CheckpointError, TensorRef

ALIGN = 512                 # byte alignment of every tensor inside a flat buffer
READ_PIECE = 64 * 2**20     # bytes per preadv call


@dataclass(frozen=True)
class Entry:
    name: str               # dotted name inside the block, e.g. "attn1.wqkv.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int             # byte offset inside a flat buffer
    nbytes: int


def block_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers of a block, each tensor object once (these are the objects whose .data we swap)."""
    return list(block.named_parameters()) + list(block.named_buffers())


class BlockLayout:
    """Byte offsets of one block's tensors in a flat buffer; identical for every block of a stack."""

    def __init__(self, block: nn.Module):
        self.entries: list[Entry] = []
        offset = 0
        for name, t in block_tensors(block):
            nbytes = t.numel() * t.element_size()
            self.entries.append(Entry(name, t.dtype, tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = max(offset, ALIGN)

    def check(self, block: nn.Module, index: int) -> None:
        got = [(n, t.dtype, tuple(t.shape)) for n, t in block_tensors(block)]
        want = [(e.name, e.dtype, e.shape) for e in self.entries]
        if got != want:
            first = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            mine, base = (got[first:first + 1] or ["nothing"])[0], (want[first:first + 1] or ["nothing"])[0]
            raise ValueError(f"block {index} differs from block 0 (tensor #{first}: {mine} vs {base}); "
                             "streamed blocks must all have the same tensors")

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed tensors of every entry inside `flat` (a uint8 buffer of at least `nbytes`)."""
        return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 view (no copy)."""
    return t.detach().reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------- segments: the bytes of one tensor

class RamSegment:
    """A tensor held in host memory (its original, possibly memory-mapped, storage)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def read(self, dst: torch.Tensor, lo: int, hi: int) -> None:
        dst.copy_(as_bytes(self.tensor.contiguous())[lo:hi])

    def materialise(self) -> torch.Tensor:
        return self.tensor


class FileSegment:
    """A tensor stored in a file in the run dtype: read its bytes straight into the destination. `original` is the
    module's tensor before streaming (normally a memory-mapped view, costing nothing while untouched)."""

    def __init__(self, fd: int, ref: TensorRef, original: torch.Tensor | None = None):
        self.fd, self.ref, self.original = fd, ref, original

    def read(self, dst: torch.Tensor, lo: int, hi: int) -> None:
        pread_into(self.fd, dst, self.ref.start + lo, self.ref.file)

    def materialise(self) -> torch.Tensor:
        if self.original is not None:
            return self.original
        out = torch.empty(self.ref.shape, dtype=self.ref.dtype)
        self.read(as_bytes(out), 0, self.ref.nbytes)
        return out


class CastSegment:
    """A tensor stored in another dtype than it runs in (e.g. bf16 file, float32 run): read, then cast. The module's
    cast copy is dropped while streaming (that is RAM) and rebuilt by `materialise`."""

    def __init__(self, fd: int, ref: TensorRef, dtype: torch.dtype):
        self.fd, self.ref, self.dtype = fd, ref, dtype

    def read(self, dst: torch.Tensor, lo: int, hi: int) -> None:
        dst.copy_(as_bytes(self.materialise())[lo:hi])

    def materialise(self) -> torch.Tensor:
        raw = torch.empty(self.ref.nbytes, dtype=torch.uint8)
        pread_into(self.fd, raw, self.ref.start, self.ref.file)
        return raw.view(self.ref.dtype).view(self.ref.shape).to(self.dtype)  # the cast load_weights applies


def pread_into(fd: int, dst: torch.Tensor, offset: int, path) -> None:
    """Fill the CPU uint8 tensor `dst` with file bytes from `offset` using positioned reads (no mmap)."""
    view = memoryview(dst.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + READ_PIECE]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: ended early while streaming weights; the file is truncated")
        done += n


def fill_range(layout: BlockLayout, segments: list, dst: torch.Tensor, a: int, b: int) -> None:
    """Write bytes [a, b) of a block's flat image into `dst` (length b - a); padding bytes are left as they are."""
    for entry, seg in zip(layout.entries, segments):
        lo, hi = max(a, entry.offset), min(b, entry.offset + entry.nbytes)
        if lo < hi:
            seg.read(dst[lo - a:hi - a], lo - entry.offset, hi - entry.offset)


def disk_segments(layout: BlockLayout, tensors: list[torch.Tensor], refs: dict[str, TensorRef] | None,
                  prefix: str, fds: dict) -> list:
    """Segments reading one block from its checkpoint file(s); tensors absent from the file stay in RAM."""
    if refs is None:
        raise ValueError("disk streaming needs the model's weight_refs (load it with loading.assign.load_weights) "
                         "or source='ram'")
    segments = []
    for entry, t in zip(layout.entries, tensors):
        ref = refs.get(prefix + entry.name)
        if ref is None:
            segments.append(RamSegment(t))
            continue
        if ref.file.suffix != ".safetensors" or ref.shape != entry.shape or not _castable(ref.dtype, entry.dtype):
            raise ValueError(f"{ref.file}: {prefix + entry.name} ({ref.dtype}) cannot be streamed from disk into "
                             f"a {entry.dtype} tensor (the module changed after loading?); use source='pinned'")
        if ref.file not in fds:
            fds[ref.file] = os.open(ref.file, os.O_RDONLY)
        fd = fds[ref.file]
        same = ref.dtype == entry.dtype
        segments.append(FileSegment(fd, ref, t.data) if same else CastSegment(fd, ref, entry.dtype))
    return segments


def _castable(stored: torch.dtype, run: torch.dtype) -> bool:
    """The casts load_weights applies: none, or between floating dtypes wider than a byte (never to/from codes)."""
    wide_float = lambda d: d.is_floating_point and d.itemsize > 1   # noqa: E731
    return stored == run or (wide_float(stored) and wide_float(run))


# ---------------------------------------------------------------- packed host copies

def pinned_bytes(nbytes: int) -> int:
    """Page-locked RAM that asking torch for `nbytes` of it takes: its caching host allocator rounds every request
    up to a power of two (its default; PYTORCH_ALLOC_CONF's pinned_max_round_threshold can stop that above a size)."""
    return 1 << max(0, (nbytes - 1).bit_length())


class HostArenas:
    """Packed host images of whole blocks, back to back in arenas of `arena_bytes` (a power of two, because the
    pinned allocator rounds every allocation up to one). Page-locked when `pin` is set."""

    def __init__(self, block_bytes: int, arena_bytes: int, pin: bool):
        if arena_bytes & (arena_bytes - 1):
            raise ValueError(f"arena size must be a power of two, got {arena_bytes}")
        self.block_bytes, self.arena_bytes, self.pin = block_bytes, arena_bytes, pin
        self.arenas: list[torch.Tensor] = []
        self.count = 0

    def cost(self, blocks: int) -> int:
        """Bytes allocated to hold `blocks` blocks."""
        total = blocks * self.block_bytes
        full, rest = divmod(total, self.arena_bytes)
        return full * self.arena_bytes + (pinned_bytes(rest) if rest else 0)

    def fit(self, budget: int, limit: int) -> int:
        """How many blocks (at most `limit`) fit in `budget` bytes."""
        n = 0
        while n < limit and self.cost(n + 1) <= budget:
            n += 1
        return n

    def allocate(self, blocks: int) -> None:
        """Allocate arenas for `blocks` blocks; on a failed allocation the arenas made so far stay (see
        `keep_whole_blocks`) and the error propagates."""
        remaining = self.cost(blocks)
        while remaining > 0:
            size = min(self.arena_bytes, remaining)
            self.arenas.append(host_buffer(size, self.pin))
            remaining -= size
        self.count = blocks

    def keep_whole_blocks(self, wanted: int) -> int:
        """After a failed `allocate`: keep the arenas covering the whole blocks they can hold (at most `wanted`),
        free the rest, and return that block count."""
        count = min(wanted, self.nbytes // self.block_bytes)
        needed = -(-count * self.block_bytes // self.arena_bytes)
        del self.arenas[needed:]
        self.count = count
        return count

    def release_from(self, byte: int) -> None:
        """Free every arena that starts at or after byte offset `byte` of the packed images."""
        first = -(-byte // self.arena_bytes)
        for k in range(first, len(self.arenas)):
            self.arenas[k] = None

    @property
    def nbytes(self) -> int:
        return sum(a.numel() for a in self.arenas if a is not None)

    def pieces(self, position: int, a: int = 0, b: int | None = None) -> list[tuple[torch.Tensor, int]]:
        """(arena slice, offset in the block image) covering bytes [a, b) of the block stored at `position`."""
        b = self.block_bytes if b is None else b
        out, v = [], position * self.block_bytes + a
        end = position * self.block_bytes + b
        while v < end:
            arena, off = divmod(v, self.arena_bytes)
            n = min(self.arena_bytes - off, end - v)
            out.append((self.arenas[arena][off:off + n], v - position * self.block_bytes))
            v += n
        return out

    def read(self, position: int, dst: torch.Tensor, a: int, b: int) -> None:
        """Copy bytes [a, b) of a stored block image into `dst` (length b - a) on the host."""
        for piece, off in self.pieces(position, a, b):
            dst[off - a:off - a + piece.numel()].copy_(piece)


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host buffer, page-locked when `pin` (CUDA copies from it can then run asynchronously)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def physical_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_ram_bytes() -> int:
    """RAM the kernel could hand out now without swapping (MemAvailable; the physical RAM where that is not
    readable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return physical_ram_bytes()


def release_cached_pinned_memory() -> None:
    """torch keeps freed page-locked blocks for reuse; give them back so the next phase has that RAM (private API,
    named differently across torch versions, hence the lookup)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
        empty = getattr(torch._C, name, None)
        if empty is not None:
            try:
                empty()
            except RuntimeError:   # no accelerator after all: nothing is cached
                pass
            return


def size_text(n: int) -> str:
    """Bytes for a log line: "1.50 GiB", "12.00 MiB", "512 B"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
