"""Read release or quantized weight files lazily (loading/assign.py puts them into modules).

Safetensors files are parsed here (header only) and memory-mapped privately: a tensor is a view into the file's
pages, so "loading" a 58 GB network touches no data until a forward pass reads it, and the file is never written.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import StepVideoError

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 2**20
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SMALL_TENSOR_ELEMS = 2**20   # tensors up to this size (norms, biases, scales, tables) are checked for NaN/inf at load
# What open_model_folder reads to catch a network whose weights are all zero (a zero-filled download, a broken
# conversion): the first bytes of a few tensors spread over the network, not the whole (a DiT is 29-59 GB).
ZERO_SAMPLES = 8
ZERO_SAMPLE_BYTES = 64 * 2**10


class CheckpointError(StepVideoError):
    """A weight file or folder is missing, corrupt or does not match the network; the message is one line."""


@dataclass(frozen=True)
class TensorRef:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int          # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """Header of one .safetensors file; tensors come out as private memory-mapped views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.refs, self.metadata = _read_header(self.path)
        self._storage = None

    def tensor(self, name: str) -> torch.Tensor:
        ref = self.refs[name]
        if self._storage is None:
            size = self.path.stat().st_size
            self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
        raw = torch.empty(0, dtype=torch.uint8).set_(self._storage, ref.start, (ref.nbytes,))
        if ref.start % max(1, ref.dtype.itemsize):
            raw = raw.clone()  # misaligned writer: copy rather than fail
        return raw.view(ref.dtype).view(ref.shape)

    def read(self, name: str) -> torch.Tensor:
        """A private in-memory copy read with plain file reads, for tensors that get cast anyway: unlike reading
        through the mapping, this leaves no file pages resident in the process."""
        ref = self.refs[name]
        buf = torch.empty(ref.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(ref.start)
            if f.readinto(memoryview(buf.numpy())) != ref.nbytes:
                raise CheckpointError(f"{self.path}: truncated at tensor {name}; re-download this file")
        return buf.view(ref.dtype).view(ref.shape)

    def head(self, name: str, nbytes: int) -> bytes:
        """The first `nbytes` bytes of a tensor's data (plain file reads)."""
        ref = self.refs[name]
        with open(self.path, "rb") as f:
            f.seek(ref.start)
            return f.read(min(nbytes, ref.nbytes))


def _read_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; re-download it")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors header (JSON {type(header).__name__}); re-download it")
    metadata = header.pop("__metadata__", None) or {}
    refs, end = {}, 0
    for name, info in header.items():
        refs[name] = _tensor_ref(path, name, info, 8 + n)
        end = max(end, refs[name].start + refs[name].nbytes)
    if size < end:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header needs {end}); re-download this file")
    return refs, metadata


def _tensor_ref(path: Path, name: str, info, data_start: int) -> TensorRef:
    """One header entry, checked so that a corrupt header fails here rather than as a torch error mid-load."""
    try:
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        shape = tuple(int(d) for d in info["shape"])
        lo, hi = (int(o) for o in info["data_offsets"])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name}; re-download this file") from None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    numel = 1
    for d in shape:
        numel *= d
    if min(shape, default=0) < 0 or lo < 0 or hi - lo != numel * dtype.itemsize:
        raise CheckpointError(f"{path}: corrupt header, tensor {name} shape {list(shape)} does not fit its bytes "
                              f"[{lo}, {hi}); re-download this file")
    return TensorRef(path, dtype, shape, data_start + lo, hi - lo)


class PickleFile:
    """A torch pickle (the release's CLIP `pytorch_model.bin`), opened without executing code and memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}); "
                                  "re-download it") from None
        if not isinstance(self._sd, dict):
            raise CheckpointError(f"{path}: does not hold a state dict")
        self.refs = {k: TensorRef(self.path, v.dtype, tuple(v.shape), 0, v.nbytes) for k, v in self._sd.items()}
        self.metadata = {}

    def tensor(self, name: str) -> torch.Tensor:
        return self._sd[name]

    read = tensor  # torch.load has already mapped the file

    def head(self, name: str, nbytes: int) -> bytes:
        t = self._sd[name].reshape(-1)
        return t[:max(1, nbytes // max(1, t.element_size()))].contiguous().view(torch.uint8).numpy().tobytes()


class WeightSource:
    """All tensors of one component folder: a single file, or shards listed by an index json."""

    def __init__(self, files: list, label: str):
        self.files, self.label = files, label
        self.where = {}
        for f in files:
            for name in f.refs:
                if name in self.where:
                    raise CheckpointError(f"{label}: tensor {name} is in both {self.where[name].path.name} and "
                                          f"{f.path.name}; shards of different downloads are mixed, re-download "
                                          "the folder")
                self.where[name] = f

    @property
    def metadata(self) -> dict[str, str]:
        return self.files[0].metadata if self.files else {}

    def keys(self) -> Iterable[str]:
        return self.where.keys()

    def ref(self, name: str) -> TensorRef:
        return self.where[name].refs[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self.where[name].tensor(name)

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    def zero_sample(self, names: list[str]) -> list[str] | None:
        """Read the first ZERO_SAMPLE_BYTES of up to ZERO_SAMPLES of `names`, spread evenly over them: the names
        read when every byte read is zero (a network that is all zero), else None. No names: None."""
        if not names:
            return None
        step = max(1, len(names) // ZERO_SAMPLES)
        picked = sorted(names)[::step][:ZERO_SAMPLES]
        for name in picked:
            if any(self.where[name].head(name, ZERO_SAMPLE_BYTES)):
                return None
        return picked


def open_weights(folder: Path, stems: tuple[str, ...]) -> WeightSource:
    """Find the weights of a component: `{stem}.safetensors.index.json`, `{stem}.safetensors` or `{stem}.bin`
    for each stem in order (e.g. ("diffusion_pytorch_model",) or ("model", "pytorch_model"))."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: folder not found; check the path")
    for stem in stems:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return WeightSource([_shard(folder / s, index) for s in _shards(index)], str(folder))
        if (folder / f"{stem}.safetensors").is_file():
            return WeightSource([SafetensorsFile(folder / f"{stem}.safetensors")], str(folder))
        if (folder / f"{stem}.bin").is_file():
            return WeightSource([PickleFile(folder / f"{stem}.bin")], str(folder))
    names = ", ".join(f"{s}.safetensors" for s in stems) + " or the .safetensors.index.json / .bin of that name"
    raise CheckpointError(f"{folder}: no weights found (expected {names}); wrong folder, or re-download the "
                          "missing file")


def _shard(path: Path, index: Path) -> SafetensorsFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: shard listed in {index.name} not found; incomplete download, re-download it")
    return SafetensorsFile(path)


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index ({e}); re-download it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map is not a name -> file mapping; re-download it")
    return list(dict.fromkeys(weight_map.values()))


def check_finite(t: torch.Tensor, ref: TensorRef, key: str) -> None:
    """A small floating tensor read from disk must hold no NaN/inf (large ones are covered by the per-step check
    of the latents); costs nothing next to the load."""
    if t.dtype in FLOAT_DTYPES and t.device.type != "meta" and t.numel() <= SMALL_TENSOR_ELEMS:
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{ref.file}: tensor {key} holds NaN or inf values; the file is corrupt, "
                                  "re-download it (or re-run quantize.py on a good source)")


