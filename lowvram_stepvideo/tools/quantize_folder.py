"""Release folder -> quantized folder, the library behind `quantize.py`.

DST has the release layout and opens with the normal loaders. Each quantized component (and the CLIP, whose torch
pickle is always converted) is written as `{stem}-0000i-of-0000n.safetensors` shards plus
`{stem}.safetensors.index.json`; the scheme is in every shard's `__metadata__` (see `models/quant.py`). Everything
else (configs, tokenizers, scheduler, model_index.json, VAE, other components) is hard-linked, or copied where links
fail; a hard-linked file is the same file in both folders, so edit neither in place.

Memory stays bounded: tensors are read a block of rows at a time with plain file reads (never through a memory
map, whose touched pages would count as resident), quantized, and written at their final offset in the shard.

Crash safety: all work happens in `DST.partial/`, renamed to DST at the very end. After each shard is written and
fsync'ed, its size and CRC-32 (over the header, then each tensor's bytes in header order) go into
`DST.partial/.quantize_state.json` together with a fingerprint of the source files and options. A re-run with the
same source and options re-reads every recorded shard and keeps it when header and checksum still match.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..pipeline import progress
from ..models import quant
from ..files.weights import (
    FLOAT_DTYPES,
    SAFETENSORS_DTYPES,
    CheckpointError,
    SafetensorsFile,
    WeightSource,
    open_weights)
from ..errors import StepVideoError
from ..files.fsutil import atomic_path
from ..loading.model_folder import TURBO_KEY, is_turbo

STATE_FILE = ".quantize_state.json"
STATE_VERSION = 1
BLOCK_ELEMS = 8 * 2**20          # source elements per block of rows (a float32 copy of a block is 32 MB)
COPY_BYTES = 64 * 2**20          # bytes per read when a tensor is copied unchanged
DEFAULT_SHARD_BYTES = 4 * 2**30
DISK_MARGIN = 64 * 2**20
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class QuantizeError(StepVideoError, ValueError):
    """A problem with the request or the folders; the message is one line and says what to do."""


@dataclass(frozen=True)
class ComponentSpec:
    folder: str                  # relative to the model folder
    stems: tuple[str, ...]       # weight file stems the loader looks for, in its order
    out_stem: str


COMPONENTS = {
    "transformer": ComponentSpec("transformer", ("diffusion_pytorch_model", "model"), "diffusion_pytorch_model"),
    "step_llm": ComponentSpec("step_llm", ("model",), "model"),
    "hunyuan_clip": ComponentSpec("hunyuan_clip/clip_text_encoder", ("model", "pytorch_model"), "model"),
}
DEFAULT_COMPONENTS = quant.DEFAULT_COMPONENTS


# ---------------------------------------------------------------- plan

@dataclass(frozen=True)
class OutTensor:
    name: str                    # key in the output file
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str                  # key in the source
    role: str                    # "copy" | "codes" | "scale"
    fmt: quant.QFormat | None = None   # for "codes"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    relpath: str                 # relative to the model folder
    tensors: list[OutTensor]
    metadata: dict[str, str]
    source_bytes: int

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Data offsets, widest dtype first so every tensor is aligned to its item size without padding."""
        spans, pos = {}, 0
        for t in sorted(self.tensors, key=lambda t: -t.dtype.itemsize):
            spans[t.name] = (pos, pos + t.nbytes)
            pos += t.nbytes
        return spans

    def header(self) -> bytes:
        spans = self.offsets()
        head = {"__metadata__": self.metadata}
        for t in self.tensors:
            head[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": list(spans[t.name])}
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    @property
    def nbytes(self) -> int:
        return len(self.header()) + sum(t.nbytes for t in self.tensors)


@dataclass
class Job:
    """One component to write: quantized (non-empty plan) or only converted to safetensors."""
    component: str
    spec: ComponentSpec
    source: WeightSource
    plan: dict[str, str]         # output weight name -> 'linear' | 'embedding'
    fmt: quant.QFormat
    shards: list[Shard] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)   # more header metadata (the DiT: turbo or not)

    def consumed(self, src: Path) -> set[Path]:
        """Source files this job replaces (not carried over)."""
        files = {Path(f.path) for f in self.source.files}
        files |= {src / self.spec.folder / f"{s}.safetensors.index.json" for s in self.spec.stems}
        return {p.resolve() for p in files if p.exists()}


def _clip_key(key: str) -> str | None:
    """The CLIP file is written under the module's keys (what loaders.open_clip's rename produces)."""
    key = key.removeprefix("bert.")
    return None if key.endswith("position_ids") else key


def _out_tensors(job: Job, key: str) -> list[OutTensor]:
    ref = job.source.ref(key)
    name = _clip_key(key) if job.component == "hunyuan_clip" else key
    if name is None:
        return []
    kind = job.plan.get(name)
    if kind is None:
        return [OutTensor(name, ref.dtype, ref.shape, key, "copy")]
    if len(ref.shape) != 2 or not ref.dtype.is_floating_point:
        raise QuantizeError(f"{job.source.label}: {key} is {ref.dtype} {list(ref.shape)}, not a float matrix; "
                            "not a Step-Video release checkpoint")
    fmt = quant.EMBEDDING_FORMAT if kind == "embedding" else job.fmt
    return [OutTensor(name, fmt.dtype, ref.shape, key, "codes", fmt),
            OutTensor(quant.scale_name(name), torch.float32, ref.shape[:1], key, "scale")]


def _plan_shards(job: Job, shard_bytes: int) -> None:
    """Group the output tensors (a weight's codes and scale together) into shards of at most `shard_bytes`."""
    groups = [(g, job.source.ref(k).nbytes) for k in job.source.keys() if (g := _out_tensors(job, k))]
    parts, size = [[]], 0
    for tensors, src_bytes in groups:
        out = sum(t.nbytes for t in tensors)
        if parts[-1] and size + out > shard_bytes:
            parts.append([])
            size = 0
        parts[-1].append((tensors, src_bytes))
        size += out
    metadata = {"format": "pt", **(quant.Scheme(job.fmt, job.plan).metadata() if job.plan else {}), **job.extra}
    stem, n = job.spec.out_stem, len(parts)
    job.shards = [Shard(f"{job.spec.folder}/{stem}-{i:05d}-of-{n:05d}.safetensors",
                        [t for tensors, _ in part for t in tensors], metadata, sum(b for _, b in part))
                  for i, part in enumerate(parts, 1)]


def plan_jobs(src: Path, fmt: quant.QFormat, components: tuple[str, ...], shard_bytes: int) -> list[Job]:
    jobs = []
    for name, spec in COMPONENTS.items():
        folder = src / spec.folder
        if name not in components and not (name == "hunyuan_clip" and _has_pickle(folder, spec)):
            continue
        if not folder.is_dir():
            raise QuantizeError(f"{src} has no {spec.folder}/ folder; pass --components with the components it has")
        source = open_weights(folder, spec.stems)
        keys = [_clip_key(k) if name == "hunyuan_clip" else k for k in source.keys()]
        plan = quant.plan_quantization(name, [k for k in keys if k]) if name in components else {}
        job = Job(name, spec, source, plan, fmt)
        if name == "transformer":   # the output folder's name may not say turbo any more: its header does
            job.extra[TURBO_KEY] = str(is_turbo(src, source.metadata)).lower()
        _plan_shards(job, shard_bytes)
        jobs.append(job)
    return jobs


def _has_pickle(folder: Path, spec: ComponentSpec) -> bool:
    try:
        source = open_weights(folder, spec.stems)
    except CheckpointError:
        return False
    return not isinstance(source.files[0], SafetensorsFile)


# ---------------------------------------------------------------- reading and writing tensors

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


def _produce(shard: Shard, reader: TensorReader, tick: Callable[[int], None]) -> Iterator[tuple[str, int, object]]:
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


def _check_finite(reader: TensorReader, t: OutTensor, chunk: torch.Tensor) -> None:
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


def write_shard(path: Path, shard: Shard, reader: TensorReader, tick: Callable[[int], None]) -> int:
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


def shard_crc(path: Path, shard: Shard) -> int | None:
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


# ---------------------------------------------------------------- checks

def check_request(src: Path, dst: Path, force: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if not src_r.is_dir():
        raise QuantizeError(f"--model-dir {src}: folder not found")
    _check_step_video(src_r)
    if dst_r == src_r or src_r in dst_r.parents:
        raise QuantizeError(f"--out {dst} is inside --model-dir {src}; choose a folder outside the source")
    if dst_r in src_r.parents:
        raise QuantizeError(f"--model-dir {src} is inside --out {dst}; choose another --out")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise QuantizeError(f"--out {dst} already exists; pass --force to replace it, or choose another folder")


def _check_step_video(src: Path) -> None:
    hint = "pass the folder that holds model_index.json, transformer/ and step_llm/"
    try:
        index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise QuantizeError(f"{src} is not a Step-Video model folder (no readable model_index.json); {hint}") from None
    if not isinstance(index, dict) or index.get("_class_name") != "StepVideoPipeline":
        raise QuantizeError(f"{src} is not a Step-Video model folder (model_index.json is not a "
                            f"StepVideoPipeline); {hint}")


def check_not_quantized(src: Path) -> None:
    for spec in COMPONENTS.values():
        try:
            source = open_weights(src / spec.folder, spec.stems)
        except CheckpointError:
            continue  # absent components are not the question here; requested ones fail in plan_jobs
        if any(quant.SCHEME_KEY in f.metadata for f in source.files):
            fmt = json.loads(source.files[0].metadata.get(quant.SCHEME_KEY, "{}") or "{}").get("format", "?")
            raise QuantizeError(f"{src} is already quantized ({spec.folder} holds {fmt} weights); "
                                "quantize the original release folder instead")


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(dst: Path, need: int) -> None:
    probe = existing_ancestor(dst)
    free = shutil.disk_usage(probe).free
    if free < need + DISK_MARGIN:
        raise QuantizeError(f"not enough disk space for {dst}: need {(need + DISK_MARGIN) / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free on {probe}; free some space or choose another --out")


# ---------------------------------------------------------------- resume state

def fingerprint(src: Path, jobs: list[Job], fmt: quant.QFormat, shard_bytes: int) -> str:
    """Identity of the source files and the options: a partial folder is only reused under the same one."""
    files = sorted({f.path.resolve() for job in jobs for f in job.source.files})
    ident = {"version": STATE_VERSION, "src": str(src.resolve()), "format": fmt.name, "shard_bytes": shard_bytes,
             "jobs": {j.component: sorted(j.plan) for j in jobs},
             "files": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def recorded_shards(partial: Path, fp: str) -> dict[str, dict]:
    """Shards recorded by a previous run with the same fingerprint (empty if none)."""
    try:
        state = json.loads((partial / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(state, dict) and state.get("fingerprint") == fp and isinstance(state.get("shards"), dict)
    return state["shards"] if ok else {}


def prepare_partial(partial: Path, reuse: bool, log) -> None:
    """Keep `partial` when some of its shards are reused; otherwise start from an empty folder."""
    if partial.exists() and not reuse:
        log(f"discarding {partial} (nothing reusable: another source or options, or no shard completed)")
        _remove(partial)
    partial.mkdir(parents=True, exist_ok=True)


def save_state(partial: Path, fp: str, shards: dict[str, dict]) -> None:
    with atomic_path(partial / STATE_FILE) as tmp:
        tmp.write_text(json.dumps({"version": STATE_VERSION, "fingerprint": fp, "shards": shards}, indent=1))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---------------------------------------------------------------- carried files

def carried_files(src: Path, jobs: list[Job]) -> list[Path]:
    """Every file of the source folder that no job replaces or overwrites (hidden folders such as .cache are
    skipped)."""
    consumed = set().union(*(job.consumed(src) for job in jobs)) if jobs else set()
    written = {Path(s.relpath) for job in jobs for s in job.shards} | {_index_path(job) for job in jobs}
    out = []
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths = [Path(root) / f for f in sorted(files)]
        out += [p for p in paths if p.resolve() not in consumed and p.relative_to(src) not in written]
    return out


def _index_path(job: Job) -> Path:
    return Path(job.spec.folder) / f"{job.spec.out_stem}.safetensors.index.json"


def carry(src: Path, partial: Path, files: list[Path]) -> tuple[int, int]:
    """Hard-link each file into `partial` (copy where linking fails). Returns (linked, copied)."""
    linked = copied = 0
    for path in files:
        target = partial / path.relative_to(src)
        if target.exists():
            _remove(target)  # left by an interrupted run: redo it, it is cheap
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
            linked += 1
        except OSError:
            shutil.copy2(path, target)
            copied += 1
    return linked, copied


def _same_device(src: Path, dst: Path) -> bool:
    return os.stat(src).st_dev == os.stat(existing_ancestor(dst)).st_dev


# ---------------------------------------------------------------- the whole conversion

@dataclass
class Result:
    jobs: list[Job]
    written: list[str]
    reused: list[str]
    seconds: float
    source_bytes: int            # bytes read and converted in this run
    verify_rows: list = field(default_factory=list)
    carried: tuple[int, int] = (0, 0)   # files of the source put in DST as they are: (hard-linked, copied)


def quantize_folder(src: Path, dst: Path, fmt_name: str, components=DEFAULT_COMPONENTS, force: bool = False,
                    verify: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Result:
    src, dst = Path(src), Path(dst)
    fmt = quant.get_format(fmt_name)
    if not isinstance(shard_bytes, int) or shard_bytes < 2**20:
        raise QuantizeError(f"shard size {shard_bytes} bytes: must be at least 1 MB (--shard-size-mb 1 or more)")
    components = _parse_components(components)
    check_request(src, dst, force)
    check_not_quantized(src)
    jobs = plan_jobs(src, fmt, components, shard_bytes)
    partial = dst.with_name(dst.name + ".partial")
    fp = fingerprint(src, jobs, fmt, shard_bytes)
    done = _reusable(partial, recorded_shards(partial, fp), jobs, log)
    files = carried_files(src, jobs)
    todo = [(job, s) for job in jobs for s in job.shards if s.relpath not in done]
    carry_bytes = 0 if _same_device(src, dst) else sum(p.stat().st_size for p in files)
    check_disk_space(dst, sum(s.nbytes for _, s in todo) + carry_bytes)
    prepare_partial(partial, bool(done), log)
    reused, start = sorted(done), time.perf_counter()
    try:
        _write_all(partial, todo, done, fp, log)
    except CheckpointError as e:   # bad source data: a rerun cannot reuse anything until the source changes
        _remove(partial)
        raise CheckpointError(f"{e} (removed {partial})") from None
    _write_indexes(partial, jobs)
    carried = carry(src, partial, files)
    (partial / STATE_FILE).unlink()
    if dst.exists() or dst.is_symlink():
        _remove(dst)
    os.rename(partial, dst)
    result = Result(jobs, [s.relpath for _, s in todo], reused, time.perf_counter() - start,
                    sum(s.source_bytes for _, s in todo), carried=carried)
    if verify:
        result.verify_rows = verify_folder(dst, jobs)
    return result


def _parse_components(components) -> tuple[str, ...]:
    names = tuple(c.strip() for c in (components.split(",") if isinstance(components, str) else components))
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown or not names:
        raise QuantizeError(f"unknown component {unknown[0] if unknown else '(none)'!r}; choose from "
                            f"{', '.join(COMPONENTS)}")
    return names


def _reusable(partial: Path, recorded: dict[str, dict], jobs: list[Job], log) -> dict[str, dict]:
    """Recorded shards whose file still has the planned header and the recorded checksum."""
    done = {}
    for shard in (s for job in jobs for s in job.shards):
        entry = recorded.get(shard.relpath)
        if entry and shard_crc(partial / shard.relpath, shard) == entry.get("crc32"):
            done[shard.relpath] = entry
            log(f"reusing {shard.relpath} (completed by an earlier run, checksum verified)")
    return done


def _write_all(partial: Path, todo: list[tuple[Job, Shard]], done: dict[str, dict], fp: str, log) -> None:
    total = sum(s.source_bytes for _, s in todo)
    with progress.bar("quantize", total, unit="B") as bar:
        for job, shard in todo:
            reader = TensorReader(job.source)
            try:
                crc = write_shard(partial / shard.relpath, shard, reader, bar.update)
            finally:
                reader.close()
            done[shard.relpath] = {"bytes": shard.nbytes, "crc32": crc}
            save_state(partial, fp, done)
            log(f"wrote {shard.relpath} ({shard.nbytes / 1e9:.2f} GB)")


def _write_indexes(partial: Path, jobs: list[Job]) -> None:
    for job in jobs:
        weight_map = {t.name: Path(s.relpath).name for s in job.shards for t in s.tensors}
        total = sum(t.nbytes for s in job.shards for t in s.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        path = partial / _index_path(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------- --verify

@dataclass(frozen=True)
class VerifyRow:
    component: str
    tensor: str
    shape: tuple[int, ...]
    rel_error: float | None      # None: the original weight is all zeros


def verify_folder(dst: Path, jobs: list[Job], samples: int = 8, batch: int = 16) -> list[VerifyRow]:
    """Relative error of sampled quantized layers against the originals: ||x Wq^T - x W^T|| / ||x W^T|| for
    random x (linears), ||Wq - W|| / ||W|| over all rows (embeddings). Reads both a block of rows at a time."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for job in (j for j in jobs if j.plan):
        out = TensorReader(open_weights(dst / job.spec.folder, (job.spec.out_stem,)))
        src = TensorReader(job.source)
        src_key = {t.name: t.source for s in job.shards for t in s.tensors if t.role == "codes"}
        names = list(job.plan)
        picks = sorted({names[round(i * (len(names) - 1) / max(samples - 1, 1))] for i in range(samples)})
        for name in picks:
            err = _layer_error(src, src_key[name], out, name, job.plan[name], batch, gen)
            rows.append(VerifyRow(job.component, name, job.source.ref(src_key[name]).shape, err))
        src.close()
        out.close()
    return rows


def _layer_error(src: TensorReader, src_key: str, out: TensorReader, name: str, kind: str, batch: int, gen):
    n_rows, cols = src.geometry(src_key)
    x = torch.randn(batch, cols, generator=gen)
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    num = den = 0.0
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        w = src.rows(src_key, r0, r1).float()                                         # (r, cols)
        wq = quant.dequantize(out.rows(name, r0, r1), out.rows(quant.scale_name(name), r0, r1).reshape(-1),
                              torch.float32)
        ref, got = (w, wq) if kind == "embedding" else (x @ w.T, x @ wq.T)            # (batch, r) for linears
        num += (got - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else None


def format_verify_table(rows: list[VerifyRow]) -> str:
    width = max([len(r.tensor) for r in rows] + [6])
    lines = [f"{'component':<13} {'tensor':<{width}} {'shape':<14} rel. error"]
    for r in rows:
        err = "n/a (zero weight)" if r.rel_error is None else f"{100 * r.rel_error:.3f}%"
        lines.append(f"{r.component:<13} {r.tensor:<{width}} {'x'.join(map(str, r.shape)):<14} {err}")
    scored = [r for r in rows if r.rel_error is not None]
    if scored:
        worst = max(scored, key=lambda r: r.rel_error)
        lines.append(f"worst layer: {worst.component} {worst.tensor} {100 * worst.rel_error:.3f}%")
    else:
        lines.append("worst layer: none (every sampled original weight is zero)")
    return "\n".join(lines)
