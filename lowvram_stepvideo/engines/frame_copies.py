"""Decoded frames leaving the device: each copy queued on a side stream into page-locked host memory, without the
host waiting for it (tiling.decode_tiled writes each time chunk's frames through one `FrameCopies`).

On CUDA a copy waits (on the side stream) for the work that made its frames, runs while the next chunk decodes, and
keeps its source tensor alive until it has landed (the caching allocator could otherwise hand that memory to the
next chunk while the copy still reads it); `finish()` waits for all of them, once per decode. Elsewhere (the CPU)
a copy is a plain copy. The memory planner runs the CUDA path of a plan for a CUDA card on its data-free device,
with stand-in streams and events (planning_machine.PlannedStreams), so the sources it keeps alive and the
page-locked output video are counted as they are held.

The memory plan asks `chunk_output_bytes` what blending a chunk on the device holds there, to decide whether the
device can hold it (else tiles are blended on the host, as they were before).
"""
from __future__ import annotations

import logging

import torch

from . import host_store
from .host_store import first_line, size_text

log = logging.getLogger(__name__)


class FrameCopies:
    """Copies of frames from the device `cuda` says into host tensors; see the module docstring. `streams`: where
    the CUDA path's streams and events come from (torch.cuda; the memory planner's stand-ins)."""

    def __init__(self, device: torch.device, cuda: bool, streams=None):
        self.device, self.cuda = torch.device(device), cuda
        self.streams = torch.cuda if streams is None else streams
        self.stream = self.streams.Stream(self.device) if cuda else None
        self.pending: list[tuple[object, torch.Tensor]] = []    # (event recorded after the copy, its source)
        self.queued = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self.cuda:
            dst.copy_(src)
            return
        streams = self.streams
        made = streams.Event()
        made.record(streams.current_stream(self.device))
        self.stream.wait_event(made)                 # after the kernels that wrote `src`
        with streams.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        landed = streams.Event()
        landed.record(self.stream)
        self.pending = [(e, s) for e, s in self.pending if not e.query()] + [(landed, src)]
        self.queued += 1

    def finish(self) -> None:
        """Wait until every queued copy has landed."""
        for landed, _ in self.pending:
            landed.synchronize()
        self.pending = []


def frame_copies(device: torch.device) -> FrameCopies:
    """The copies out of a decode that blends on `device`."""
    return FrameCopies(device, torch.device(device).type == "cuda")


def output_video(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pinned: bool) -> torch.Tensor:
    """The decode's output video: page-locked when `pinned` and on the host (so copies into it run asynchronously);
    pageable RAM, with a warning, when the RAM cannot be page-locked (the copies then wait)."""
    if not pinned or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    try:
        buffer = host_store.host_buffer(nbytes, pin=True)
    except RuntimeError as e:
        log.warning("could not page-lock %s for the decoded video (%s); copying frames into pageable RAM",
                    size_text(nbytes), first_line(e))
        buffer = host_store.host_buffer(nbytes, pin=False)
    return buffer.view(dtype).view(shape)


def chunk_output_bytes(batch: int, frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Device bytes that blending one time chunk of `frames` frames (height x width pixels) there holds beyond
    its tiles: the float32 blend, the chunk in the decoder's dtype, and a frame held for the next boundary."""
    pixels = batch * 3 * height * width
    itemsize = torch.empty((), dtype=dtype).element_size()
    return pixels * frames * (4 + itemsize) + pixels * itemsize
