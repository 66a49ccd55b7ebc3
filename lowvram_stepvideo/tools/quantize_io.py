"""Reading a source tensor a block of rows at a time and writing a shard at its final offsets (quantizing where the
plan says), with the CRC-32 a resumed run checks a shard against."""
from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models import quant
from ..files.weights import FLOAT_DTYPES, CheckpointError, SafetensorsFile, WeightSource


BLOCK_ELEMS = 8 * 2**20          # source elements per block of rows (a float32 copy of a block is 32 MB)


COPY_BYTES = 64 * 2**20          # bytes per read when a tensor is copied unchanged


class TensorReader:
    """Blocks of rows and byte ranges of one folder's tensors, read with plain file reads."""

    def __init__(self, source: WeightSource):
        self.source = source
        self.files: dict[Path, object] = {}
        self.pool = ThreadPoolExecutor(max_workers=1)  # reads the next block while the current one is processed

    def close(self) -> None:
        self.pool.shutdown()
        for f in self.files.values():
            f.close()

    def geometry(self, key: str) -> tuple[int, int]:
        shape = self.source.ref(key).shape
        rows = shape[0] if shape else 1
        return rows, (math.prod(shape) // rows if rows else 0)

    def rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of the tensor viewed as (rows, cols), in its stored dtype."""
        ref = self.source.ref(key)
        _, cols = self.geometry(key)
        if not isinstance(self.source.where[key], SafetensorsFile):
            return self.source.tensor(key).reshape(-1, cols)[r0:r1]
        row_bytes = cols * ref.dtype.itemsize
        return self._read(ref.file, ref.start + r0 * row_bytes, (r1 - r0) * row_bytes).view(ref.dtype).view(-1, cols)

    def raw(self, key: str, b0: int, b1: int) -> torch.Tensor:
        """Bytes b0..b1 of the tensor's data as uint8."""
        ref = self.source.ref(key)
        if not isinstance(self.source.where[key], SafetensorsFile):
            return self.source.tensor(key).contiguous().reshape(-1).view(torch.uint8)[b0:b1]
        return self._read(ref.file, ref.start + b0, b1 - b0)

    def _read(self, path: Path, offset: int, n: int) -> torch.Tensor:
        f = self.files.get(path) or self.files.setdefault(path, open(path, "rb", buffering=0))
        buf = torch.empty(n, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        f.seek(offset)
        while got < n:
            k = f.readinto(view[got:])
            if not k:
                raise CheckpointError(f"{path}: truncated while reading; re-download this file")
            got += k
        return buf


def _as_bytes(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _produce(shard, reader: TensorReader, tick: Callable[[int], None]) -> Iterator[tuple[str, int, object]]:
    """(output name, byte position inside that tensor, bytes) for every tensor of the shard, in header order."""
    scales: dict[str, torch.Tensor] = {}
    for t in shard.tensors:
        if t.role == "scale":
            yield t.name, 0, _as_bytes(scales.pop(t.source))
        elif t.role == "codes":
            parts = []
            for pos, codes, scale, src_bytes in _quantized_blocks(reader, t.source, t.fmt):
                parts.append(scale)
                yield t.name, pos, _as_bytes(codes)
                tick(src_bytes)
            scales[t.source] = torch.cat(parts) if parts else torch.empty(0)
        else:
            spans = [(t.source, b0, min(t.nbytes, b0 + COPY_BYTES)) for b0 in range(0, t.nbytes, COPY_BYTES)]
            for (_, b0, _), chunk in zip(spans, _read_ahead(reader.pool, spans, reader.raw)):
                _check_finite(reader, t, chunk)
                yield t.name, b0, chunk.numpy()
                tick(chunk.numel())


def _check_finite(reader: TensorReader, t, chunk: torch.Tensor) -> None:
    """A float tensor copied unchanged must hold no NaN/inf either (quantized ones are checked by quantize_rows)."""
    if t.dtype in FLOAT_DTYPES and not torch.isfinite(chunk.view(t.dtype)).all():
        raise CheckpointError(f"{reader.source.label}: tensor {t.source} holds NaN or inf values; the checkpoint "
                              "is corrupt, re-download it")


def _read_ahead(pool: ThreadPoolExecutor, spans: list, read: Callable):
    """Yield read(*span) for each span while the next one is read in `pool` (file reads and torch ops release
    the GIL, so reading overlaps quantizing). The pending read is awaited even if the caller stops early."""
    pending = pool.submit(read, *spans[0]) if spans else None
    try:
        for i in range(len(spans)):
            result = pending.result()
            pending = pool.submit(read, *spans[i + 1]) if i + 1 < len(spans) else None
            yield result
    finally:
        if pending is not None:
            pending.exception()


def _quantized_blocks(reader: TensorReader, key: str, fmt: quant.QFormat):
    rows, cols = reader.geometry(key)
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    spans = [(key, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    for (_, r0, _), block in zip(spans, _read_ahead(reader.pool, spans, reader.rows)):
        try:
            codes, scale = quant.quantize_rows(block, fmt)
        except ValueError as e:
            raise CheckpointError(f"{reader.source.label}: tensor {key}: {e}") from None
        yield r0 * cols, codes, scale, block.numel() * block.element_size()


def write_shard(path: Path, shard, reader: TensorReader, tick: Callable[[int], None]) -> int:
    """Write one shard (preallocated, each tensor at its final offset), fsync it, return its CRC-32."""
    header, spans = shard.header(), shard.offsets()
    crc = zlib.crc32(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(shard.nbytes)
        for name, pos, data in _produce(shard, reader, tick):
            _pwrite_all(f.fileno(), memoryview(data).cast("B"), len(header) + spans[name][0] + pos)
            crc = zlib.crc32(data, crc)
        os.fsync(f.fileno())
    return crc


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def shard_crc(path: Path, shard) -> int | None:
    """CRC-32 of a written shard (same order as `write_shard`), or None if its header is not the planned one."""
    header, spans = shard.header(), shard.offsets()
    if not path.is_file() or path.stat().st_size != shard.nbytes:
        return None
    with open(path, "rb") as f:
        if f.read(len(header)) != header:
            return None
        crc = zlib.crc32(header)
        for t in shard.tensors:
            b0, b1 = spans[t.name]
            f.seek(len(header) + b0)
            for pos in range(b0, b1, COPY_BYTES):
                crc = zlib.crc32(f.read(min(COPY_BYTES, b1 - pos)), crc)
    return crc
