"""The host side of a streamed block stack (the store behind streaming.BlockStreamer): where each streamed block's
bytes live between its forwards, reading them into a host or device buffer, and giving every block its original
tensors back when streaming ends.

A streamed block is "packed" (a copy in the host arenas, as many as the packed budget holds, filled at attach),
"pageable" (read at each forward from the checkpoint's page cache with positioned reads, or from the module's own
tensors where the file does not hold them as they run) or "disk" (source "disk": read from the checkpoint files).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .host_store import (
    BlockLayout,
    CastSegment,
    HostArenas,
    RamSegment,
    as_bytes,
    disk_segments,
    fill_range,
    first_line,
    size_text)


class BlockStore:
    """Where the streamed blocks `order` of a stack live. tensors: every block's tensor objects (layout order);
    resident: the indices kept on the device; pin: page-lock the packed images (CUDA); warn: called once per
    problem worth a warning (RAM that could not be allocated or page-locked)."""

    def __init__(self, tensors: list[list[torch.Tensor]], layout: BlockLayout, order: list[int], resident,
                 source: str, pin: bool, cuda: bool, weight_refs: dict | None, prefix: str, arena_bytes: int,
                 warn: Callable[[str], None]):
        self.tensors, self.layout, self.order, self.resident = tensors, layout, order, resident
        self.source, self.pin, self.cuda = source, pin, cuda
        self.weight_refs, self.prefix, self._warn = weight_refs, prefix, warn
        self.arenas = HostArenas(layout.nbytes, arena_bytes, pin)
        self.kind: dict[int, str] = {}          # streamed block -> "packed" | "pageable" | "disk"
        self.pin_pos: dict[int, int] = {}       # packed block -> its position in the arenas
        self.segments: dict[int, list] = {}     # unpacked block -> where its tensors are read from
        self.fds: dict = {}
        self.originals = {i: self._kept_originals(i) for i in range(len(tensors))}

    def fill(self, budget: int) -> None:
        """Decide where each streamed block lives and fill the packed images of those that fit `budget`."""
        n_packed = self._allocate_arenas(self.arenas.fit(budget, len(self.order)))
        for pos, i in enumerate(self.order):
            if pos < n_packed:
                segments = self._packing_segments(i)
                for piece, off in self.arenas.pieces(pos):
                    fill_range(self.layout, segments, piece, off, off + piece.numel())
                self.kind[i], self.pin_pos[i] = "packed", pos
            else:
                self.kind[i] = "disk" if self.source == "disk" else "pageable"
                self.segments[i] = self._source_segments(i)

    @property
    def nbytes(self) -> int:
        """Host bytes of the packed images."""
        return self.arenas.nbytes if self.arenas is not None else 0

    def counts(self) -> dict[str, int]:
        kinds = list(self.kind.values())
        return {k: kinds.count(k) for k in ("packed", "pageable", "disk")}

    def read(self, j: int, dst: torch.Tensor, a: int, b: int) -> None:
        """Bytes [a, b) of block j's image into the host buffer `dst`."""
        if self.kind[j] == "packed":
            self.arenas.read(self.pin_pos[j], dst, a, b)
        else:
            fill_range(self.layout, self.segments[j], dst, a, b)

    def pieces(self, j: int) -> list[tuple[torch.Tensor, int]]:
        """(arena slice, offset in the image) of packed block j."""
        return self.arenas.pieces(self.pin_pos[j])

    # ------------------------------------------------------------ giving the tensors back

    def restore_resident(self) -> None:
        for i in self.resident:
            for t, original in zip(self.tensors[i], self.originals[i]):
                t.data = original if original is not None else t.data.to("cpu")

    def restore_streamed(self) -> None:
        """Originals back; missing ones rebuilt. Packed blocks go from the last arena position down, each arena
        released once no block left to restore lies in it."""
        for i in sorted(self.order, key=lambda i: self.pin_pos.get(i, -1), reverse=True):
            kept = self.originals[i]
            rebuilt = self._host_tensors(i) if any(t is None for t in kept) else [None] * len(kept)
            for t, original, new in zip(self.tensors[i], kept, rebuilt):
                t.data = original if original is not None else new
            if i in self.pin_pos:
                self.arenas.release_from(self.pin_pos[i] * self.layout.nbytes)

    def free(self) -> None:
        """Release the arenas and close the files (the blocks' tensors are not touched)."""
        if self.arenas is not None:
            self.arenas.release_from(0)
        self.arenas = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.originals, self.segments = {}, {}

    def _kept_originals(self, i: int) -> list[torch.Tensor | None]:
        """Block i's tensors that can be given back as they are: memory-mapped views of the checkpoint (the file
        has the tensor in its run dtype), and every tensor a CPU engine leaves in place (resident blocks). Copies
        (cast at load, in-memory models) are not kept while the block streams: that would be RAM twice."""
        if i in self.resident and not self.cuda:
            return [t.data for t in self.tensors[i]]
        refs = self.weight_refs or {}
        out = []
        for e, t in zip(self.layout.entries, self.tensors[i]):
            ref = refs.get(f"{self.prefix}{i}.{e.name}")
            out.append(t.data if ref is not None and ref.dtype == t.dtype and ref.shape == e.shape else None)
        return out

    def _host_tensors(self, i: int) -> list[torch.Tensor]:
        """Plain host tensors of a streamed block, rebuilt from where it lives."""
        if self.kind[i] != "packed":
            return [seg.materialise() for seg in self.segments[i]]
        out = []
        for e in self.layout.entries:
            t = torch.empty(e.shape, dtype=e.dtype)
            self.arenas.read(self.pin_pos[i], as_bytes(t), e.offset, e.offset + e.nbytes)
            out.append(t)
        return out

    # ------------------------------------------------------------ sources

    def _allocate_arenas(self, blocks: int) -> int:
        """Allocate packed images for `blocks` blocks; if the RAM (or the page-locking of it) is refused, keep the
        whole blocks that did fit and warn once. Returns how many blocks are packed."""
        try:
            self.arenas.allocate(blocks)
            return blocks
        except RuntimeError as e:     # RLIMIT_MEMLOCK, a full RAM, or a driver that cannot pin more
            got = self.arenas.keep_whole_blocks(blocks)
            self._warn(f"could not {'page-lock' if self.pin else 'allocate'} {size_text(self.arenas.cost(blocks))} "
                       f"of host RAM for packed blocks ({first_line(e)}); {got} of {blocks} blocks packed, the "
                       "others are read from the checkpoint or pageable RAM at each forward (slower copies)")
            return got

    def _source_segments(self, i: int) -> list:
        """Where an unpacked block is read from at each forward: its checkpoint file (source "disk"; for "ram" too
        when the file holds the block as it runs, so no cast is repeated), else the module's tensors."""
        if self.source == "disk":
            return disk_segments(self.layout, self.tensors[i], self.weight_refs, f"{self.prefix}{i}.", self.fds)
        segments = self._file_segments(i)
        if segments is None or any(isinstance(seg, CastSegment) for seg in segments):
            return [RamSegment(t.data) for t in self.tensors[i]]
        return segments

    def _packing_segments(self, i: int) -> list:
        return self._file_segments(i) or [RamSegment(t.data) for t in self.tensors[i]]

    def _file_segments(self, i: int) -> list | None:
        """Block i read from the checkpoint with positioned reads, if its weights are there as loaded. Reading
        through the memory map instead would leave the file's pages mapped into this process: the block counted
        again in its RSS, on top of the packed image or slot it was copied into."""
        if self.weight_refs is None:
            return None
        try:
            return disk_segments(self.layout, self.tensors[i], self.weight_refs, f"{self.prefix}{i}.", self.fds)
        except ValueError:        # the module changed after loading (e.g. quantized in memory)
            return None
