"""Tiled VAE decode: the reference's 3-latent time chunks, each split into overlapping spatial tiles.

The reference decodes latents in chunks of 3 (17 frames each), concatenates them and blends every chunk boundary
(docs/STEPVIDEO.md §7). Spatial tiling is not in the reference: it changes the numbers near tile seams (the
decoder's attention and per-frame GroupNorm see only the tile) but bounds the decoder's activation memory by the
tile size. Overlapping tiles are blended with linear ramps whose weights sum to 1. With one tile covering the frame
the result is identical to the reference chunked decode.

Tiles are blended on the device that decodes them, in float32 (the arithmetic of a blend on the host, done where
the tiles are: no tile leaves the device), unless the caller blends on the host (`blend_device`: when the memory
plan says the device cannot hold a chunk's output, engines.frame_copies.chunk_output_bytes). Each time chunk's
frames then leave the device once (its last frame with the next chunk, after their boundary is blended), into one
preallocated output video: from a CUDA device asynchronously, on a side stream, into page-locked memory
(frame_copies.py). `DecodeState` records how far a decode got, so after an out-of-memory error the caller can retry
with smaller tiles without redoing finished chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import StepVideoError
from ..models.vae import mix_chunks
from .frame_copies import FrameCopies, frame_copies, output_video

DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # (B, t<=3, C, h, w) latents -> (B, T, 3, H, W) frames
Progress = Callable[[int, int], None]               # (tiles done, tiles total) of the current call, from (0, total)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class TileOOMError(StepVideoError, RuntimeError):
    """The decode ran out of memory even with the smallest tile size tried."""


def chunk_frames(num_latents: int) -> int:
    """Frames the Step-Video decoder makes from one chunk of k <= 3 latents: (2k-1)*4-3 (3 -> 17, 2 -> 9, 1 -> 1)."""
    return (2 * num_latents - 1) * 4 - 3


def mix_boundary(video: torch.Tensor, first: int, frame_len: int = 17) -> None:
    """Blend, in place, the boundary between the chunk ending at frame first-1 and the one starting at `first`
    (the VAE's sequential 0.6/0.4 `mix_chunks`, applied to this boundary only). video: (B, F, 3, H, W)."""
    mix_chunks(video[:, first - frame_len:first + 1], frame_len, inplace=True)  # window: one whole chunk + 1 frame


def decode_untiled(decode_chunk: DecodeFn, z: torch.Tensor, latents_per_chunk: int = 3) -> torch.Tensor:
    """The reference decode: chunks of 3 latents decoded independently, concatenated, boundaries blended."""
    video = torch.cat([decode_chunk(c) for c in z.split(latents_per_chunk, dim=1)], dim=1)  # (B, F, 3, H, W)
    return mix_chunks(video, chunk_frames(latents_per_chunk), inplace=True)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of tiles covering [0, length): as few tiles as `tile` allows, all of one size (at most `tile`,
    as small as the coverage allows), spread evenly so consecutive ones overlap by at least `overlap`. Equal tiles
    with the least total area keep the decoder's extra work low (see `tile_overhead`) and give one tile shape.
    One span when the tile covers the whole length."""
    if tile >= length:
        return [(0, length)]
    count = -(-(length - overlap) // (tile - overlap))          # fewest tiles of `tile` covering `length`
    size = -(-(length + (count - 1) * overlap) // count)        # smallest equal size that still covers
    starts = [round(j * (length - size) / (count - 1)) for j in range(count)]
    return [(s, s + size) for s in starts]


def tile_overhead(size: tuple[int, int], tile, overlap) -> float:
    """Decoded area of all tiles over the frame's area: the decoder's work relative to an untiled decode (its
    convolutions dominate; 1.0 = untiled)."""
    (th, tw), (oh, ow) = _pair(tile, "tile"), _pair(overlap, "tile overlap")
    covered = [sum(e - s for s, e in tile_spans(n, t, o)) / n for n, t, o in zip(size, (th, tw), (oh, ow))]
    return covered[0] * covered[1]


def _ramp(n: int, rising: bool) -> torch.Tensor:
    """Linear ramp over n pixels, strictly inside (0, 1): (i + 0.5) / n, float32."""
    r = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return r if rising else r.flip(0)


def axis_weights(spans: Sequence[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Blend weight of each tile along one axis, in output pixels (span * scale): 1 inside, a linear ramp across
    each overlap with a neighbour; normalised so the weights of all tiles sum to 1 at every pixel."""
    raw = []
    for j, (s, e) in enumerate(spans):
        w = torch.ones((e - s) * scale, dtype=torch.float32)
        if j > 0 and spans[j - 1][1] > s:           # overlap with the previous tile: rise
            n = (spans[j - 1][1] - s) * scale
            w[:n] *= _ramp(n, rising=True)
        if j + 1 < len(spans) and spans[j + 1][0] < e:  # overlap with the next tile: fall
            n = (e - spans[j + 1][0]) * scale
            w[-n:] *= _ramp(n, rising=False)
        raw.append(w)
    total = torch.zeros(spans[-1][1] * scale, dtype=torch.float32)
    for (s, e), w in zip(spans, raw):
        total[s * scale:e * scale] += w
    return [w / total[s * scale:e * scale] for (s, e), w in zip(spans, raw)]


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"VAE {name} must be an int or a pair of ints (latent pixels), got {value!r}")
    return pair


def check_tiling(tile, overlap, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate tile and overlap (latent pixels, int or (h, w)) for a latent frame of `size` (h, w)."""
    tile, overlap = _pair(tile, "tile"), _pair(overlap, "tile overlap")
    for axis, t, o, n in zip(("height", "width"), tile, overlap, size):
        if t < 1:
            raise ValueError(f"VAE tile {axis} must be at least 1 latent pixel, got {t}")
        if o < 0:
            raise ValueError(f"VAE tile overlap must not be negative, got {o} ({axis})")
        if t < n and o >= t:
            raise ValueError(f"VAE tile overlap {o} must be smaller than the tile {axis} {t} "
                             "(use a smaller overlap or a larger tile)")
    return tile, overlap


@dataclass
class DecodeState:
    """How far a decode got: the output video (allocated at the first chunk) and the next chunk to decode.
    Pass the same state to a retry (e.g. with smaller tiles after an out-of-memory error) to keep finished chunks;
    the chunk that failed is decoded again from scratch."""
    out: torch.Tensor | None = None  # (B, F, 3, H, W), chunk boundaries before `next_chunk` already blended
    next_chunk: int = 0
    held: torch.Tensor | None = None  # the last finished chunk's last frame (B, 1, 3, H, W), not blended or written


def _decode_tile(decode_chunk: DecodeFn, z: torch.Tensor, ys: tuple[int, int], xs: tuple[int, int],
                 scale: int) -> torch.Tensor:
    """Decode latents z[..., y0:y1, x0:x1] and check the decoder returned (B, T, C, (y1-y0)*scale, (x1-x0)*scale)."""
    frames = decode_chunk(z[..., ys[0]:ys[1], xs[0]:xs[1]])
    want = (z.shape[0], chunk_frames(z.shape[1]), (ys[1] - ys[0]) * scale, (xs[1] - xs[0]) * scale)
    got = tuple(frames.shape)
    if frames.dim() != 5 or (got[0], got[1], got[3], got[4]) != want:
        raise ValueError(f"VAE chunk decoder returned shape {got}, expected (B, T, C, H, W) = "
                         f"({want[0]}, {want[1]}, C, {want[2]}, {want[3]}) for latents {tuple(z.shape)}")
    return frames


def _decode_time_chunk(decode_chunk: DecodeFn, z: torch.Tensor, tiles_y, tiles_x, scale: int,
                       device: torch.device, tick: Callable[[], None]) -> tuple[torch.Tensor, torch.dtype]:
    """Decode one time chunk (B, t, C, h, w) tile by tile; tiles_y/tiles_x: ((start, end), blend weight) per tile
    along each axis. Returns the chunk video and the decoder's dtype; with several tiles the video is their float32
    blend on `device`, with one tile the decoder output itself."""
    if len(tiles_y) == 1 and len(tiles_x) == 1:
        frames = _decode_tile(decode_chunk, z, tiles_y[0][0], tiles_x[0][0], scale)
        tick()
        return frames, frames.dtype
    acc, dtype = None, None
    for (y0, y1), wy in tiles_y:
        for (x0, x1), wx in tiles_x:
            frames = _decode_tile(decode_chunk, z, (y0, y1), (x0, x1), scale)
            if acc is None:  # (B, T, C, H, W) float32 blend of the whole chunk
                b, t, c = frames.shape[:3]
                acc = torch.zeros(b, t, c, tiles_y[-1][0][1] * scale, tiles_x[-1][0][1] * scale, device=device)
                dtype = frames.dtype
            weight = wy[:, None] * wx[None, :]  # (H_tile, W_tile) on `device`, broadcast over (B, T, C)
            region = acc[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale]
            region.addcmul_(frames.to(device, torch.float32), weight)
            del frames
            tick()
    return acc, dtype


def tile_count(latents_shape: Sequence[int], tile, overlap=0, latents_per_chunk: int = 3) -> int:
    """Tiles `decode_tiled` decodes for latents of shape (B, T, C, h, w): time chunks x tiles per frame."""
    _, num_latents, _, h, w = latents_shape
    tile, overlap = check_tiling(tile, overlap, (h, w))
    per_frame = len(tile_spans(h, tile[0], overlap[0])) * len(tile_spans(w, tile[1], overlap[1]))
    return -(-num_latents // latents_per_chunk) * per_frame


def _chunk_layout(num_latents: int, per_chunk: int) -> tuple[list[int], list[int]]:
    """Latents in each time chunk, and each chunk's first output frame followed by the total frame count."""
    sizes = [min(per_chunk, num_latents - s) for s in range(0, num_latents, per_chunk)]
    starts = [sum(chunk_frames(n) for n in sizes[:k]) for k in range(len(sizes) + 1)]
    return sizes, starts


def _counter(progress: Progress | None, total: int) -> Callable[[], None]:
    done = 0
    if progress is not None:
        progress(0, total)   # the total is known before the first tile

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
    return tick


def _check_state(state: DecodeState, z: torch.Tensor, n_chunks: int, total_frames: int, scale: int) -> None:
    if state.out is None:
        return
    _, _, _, h, w = z.shape
    o = state.out.shape
    if (o[0], o[1], o[3], o[4]) != (z.shape[0], total_frames, h * scale, w * scale) or state.next_chunk > n_chunks:
        raise ValueError(f"decode state does not belong to these latents: output {tuple(o)}, next chunk "
                         f"{state.next_chunk} of {n_chunks} for latents {tuple(z.shape)} (start a new DecodeState)")


def decode_tiled(decode_chunk: DecodeFn, z: torch.Tensor, tile, overlap=0, scale: int = 16,
                 latents_per_chunk: int = 3, progress: Progress | None = None, state: DecodeState | None = None,
                 out_device: torch.device | str | None = None,
                 blend_device: torch.device | str | None = None, copies: FrameCopies | None = None) -> torch.Tensor:
    """Decode latents z (B, T, C, h, w) into a video (B, F, 3, h*scale, w*scale) in the decoder's dtype.

    Time: chunks of `latents_per_chunk` latents as in the reference, boundaries blended (`mix_boundary`'s
    arithmetic). Space: tiles of `tile` latent pixels overlapping by `overlap` (int or (h, w)), blended with linear
    ramps in float32 on `blend_device` (default: z's device). The video is allocated on `out_device` (default: z's
    device; page-locked when it is the host and the frames leave a CUDA device); `copies`: how the frames leave the
    blend's device (default: frame_copies.frame_copies of it); give a `state` to resume after an error.
    `progress(done, total)` counts the tiles of this call: (0, total) before the first one, then once per
    tile."""
    state = state if state is not None else DecodeState()
    _, num_latents, _, h, w = z.shape
    tile, overlap = check_tiling(tile, overlap, (h, w))
    spans_y, spans_x = tile_spans(h, tile[0], overlap[0]), tile_spans(w, tile[1], overlap[1])
    sizes, starts = _chunk_layout(num_latents, latents_per_chunk)
    _check_state(state, z, len(sizes), starts[-1], scale)
    device = state.out.device if state.out is not None else torch.device(out_device or z.device)
    blend = torch.device(blend_device or z.device)
    copies = frame_copies(blend) if copies is None else copies
    tick = _counter(progress, (len(sizes) - state.next_chunk) * len(spans_y) * len(spans_x))
    tiles_y, tiles_x = ([(span, weight.to(blend)) for span, weight in zip(spans, axis_weights(spans, scale))]
                        for spans in (spans_y, spans_x))    # the weights go to the blend's device once
    try:
        for k in range(state.next_chunk, len(sizes)):
            first = k * latents_per_chunk
            video, dtype = _decode_time_chunk(decode_chunk, z[:, first:first + sizes[k]], tiles_y, tiles_x, scale,
                                              blend, tick)
            if state.out is None:
                b, _, c = video.shape[:3]
                state.out = output_video((b, starts[-1], c, h * scale, w * scale), dtype, device, copies.cuda)
            _write_chunk(state, video.to(dtype), starts[k], copies, last=k + 1 == len(sizes))
            del video
            state.next_chunk = k + 1
    finally:
        copies.finish()      # every queued copy has landed before the video (or the state after an error) is read
    return state.out


def _write_chunk(state: DecodeState, video: torch.Tensor, start: int, copies: FrameCopies, last: bool) -> None:
    """One finished chunk (B, T, 3, H, W) into the output from frame `start`: its first frame blended with the
    held last frame of the chunk before (mix_chunks over those two frames: the boundary's arithmetic, in the
    video's dtype), then every frame but its own last one, which is held for the next boundary (or written, after
    the last chunk)."""
    if state.held is not None:
        pair = torch.cat([state.held, video[:, :1]], dim=1)      # (B, 2, 3, H, W): the boundary's two frames
        mix_chunks(pair, frame_len=1, inplace=True)
        video[:, :1] = pair[:, 1:]
        copies.copy(state.out[:, start - 1:start], pair[:, :1])
        state.held = None
    if video.shape[1] > 1:
        copies.copy(state.out[:, start:start + video.shape[1] - 1], video[:, :-1])
    if last:
        copies.copy(state.out[:, start + video.shape[1] - 1:start + video.shape[1]], video[:, -1:])
    else:
        state.held = video[:, -1:].clone()    # a frame, not a view keeping the whole chunk alive


def halving_tiles(tile, overlap, size: tuple[int, int], min_tile: int = 8) -> list[tuple[int, int]]:
    """Tile sizes to try in turn on out-of-memory: `tile` clamped to the latent frame `size` (h, w), then halved
    (rounded up) per side, never below max(min_tile, 2 * overlap + 1) latent pixels or above the frame."""
    tile, overlap = _pair(tile, "tile"), _pair(overlap, "tile overlap")
    floor = [min(n, max(min_tile, 2 * o + 1)) for n, o in zip(size, overlap)]
    current = tuple(min(t, n) for t, n in zip(tile, size))
    tiles = [current]
    while True:
        nxt = tuple(max(f, -(-t // 2)) for t, f in zip(current, floor))
        if nxt == current:
            return tiles
        tiles.append(nxt)
        current = nxt


def decode_with_fallback(decode_chunk: DecodeFn, z: torch.Tensor, tiles: Sequence, overlap=0,
                         on_oom: Callable[[tuple, tuple], None] | None = None, **kwargs) -> torch.Tensor:
    """`decode_tiled` with the first tile size of `tiles`; on an out-of-memory error the finished chunks are kept
    and the decode goes on with the next (smaller) size. `on_oom(failed_tile, next_tile)` runs after the error's
    tensors are released (free caches there, log). Raises TileOOMError when the last size fails too."""
    state = DecodeState()
    for i, tile in enumerate(tiles):
        try:
            return decode_tiled(decode_chunk, z, tile, overlap, state=state, **kwargs)
        except _OOM:
            pass  # handled below, outside the except block: its traceback still holds the failed chunk's tensors
        if i + 1 < len(tiles) and on_oom is not None:
            on_oom(tuple(_pair(tile, "tile")), tuple(_pair(tiles[i + 1], "tile")))
    smallest = "x".join(str(v) for v in _pair(tiles[-1], "tile")) if tiles else "(none)"
    raise TileOOMError(f"VAE decode ran out of memory even with {smallest} latent-pixel tiles "
                       f"(chunk {state.next_chunk + 1}); use a smaller VAE tile or free GPU memory")
