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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..pipeline import progress
from ..models import quant
from ..files.weights import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    SafetensorsFile,
    WeightSource,
    open_weights)
from ..files.fsutil import atomic_path
from ..errors import StepVideoError
from ..loading.model_folder import TURBO_KEY, is_turbo
from ..pipeline.preview_map import STORED_NAME, store_preview_map
from .quantize_checks import QuantizeError, check_disk_space, check_request, existing_ancestor
from .quantize_io import TensorReader, shard_crc, write_shard
from .quantize_verify import verify_folder

STATE_FILE = ".quantize_state.json"
STATE_VERSION = 1
DEFAULT_SHARD_BYTES = 4 * 2**30
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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


# ---------------------------------------------------------------- checks


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
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                    preview_map: bool = True) -> Result:
    """`preview_map`: fit the live preview's latent-to-RGB map of a VAE with an encoder and store it in DST's vae/
    (about a minute for the release's VAE on 2 cores)."""
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
    if preview_map:
        _store_preview_map(partial / "vae", log)
    (partial / STATE_FILE).unlink()
    if dst.exists() or dst.is_symlink():
        _remove(dst)
    os.rename(partial, dst)
    result = Result(jobs, [s.relpath for _, s in todo], reused, time.perf_counter() - start,
                    sum(s.source_bytes for _, s in todo), carried=carried)
    if verify:
        result.verify_rows = verify_folder(dst, jobs)
    return result


def _store_preview_map(vae_folder: Path, log) -> None:
    """The live preview's map, fitted once here (pipeline/preview_map.py); a failure costs only a fit on first use."""
    if not (vae_folder / "vae_v2.safetensors").exists():
        return
    start = time.perf_counter()
    try:
        stored = store_preview_map(vae_folder)
    except (StepVideoError, RuntimeError, ValueError, OSError) as e:
        log(f"preview map: not stored ({str(e).splitlines()[0]}); a run fits it on first use")
        return
    if stored is not None:
        log(f"preview map: fitted in {time.perf_counter() - start:.0f} s, stored in {vae_folder.name}/{STORED_NAME}")


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


