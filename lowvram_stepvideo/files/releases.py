"""The published releases, as shapes that ship with the package: a memory plan (and a time estimate) of a release
before it is downloaded.

`lowvram_stepvideo/release_shapes/<release>/` holds, per component, the release's config.json and tensors.json.gz
(every tensor's name and shape, the component's dtype and the file the release stores it in), written by
scripts/make_release_shapes.py from the release's configs and tensor manifest. No tokenizers and no weights: a
`shapes_source` answers every question about the weights except their values.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import SAFETENSORS_DTYPES, CheckpointError, TensorRef, WeightSource

SHAPES_DIR = Path(__file__).resolve().parent.parent / "release_shapes"


@dataclass(frozen=True)
class Release:
    repo: str          # the hub name, e.g. "stepfun-ai/stepvideo-t2v-turbo"
    folder: str        # its shapes under SHAPES_DIR
    turbo: bool        # the step-distilled checkpoint: the same shapes, other sampling defaults

    @property
    def root(self) -> Path:
        return SHAPES_DIR / self.folder


RELEASES = (Release("stepfun-ai/stepvideo-t2v", "stepvideo-t2v", False),
            Release("stepfun-ai/stepvideo-t2v-turbo", "stepvideo-t2v", True),
            Release("stepfun-ai/stepvideo-ti2v", "stepvideo-ti2v", False))


def published_release(name: str) -> Release | None:
    """The release a --model-dir names by its hub name ("stepfun-ai/stepvideo-t2v", case and a trailing slash do not
    matter), or None."""
    key = str(name).strip().rstrip("/").lower()
    return next((r for r in RELEASES if r.repo == key), None)


class ShapesFile:
    """One component's tensors as the release stores them, without the file: names, shapes and dtypes."""

    def __init__(self, release: Release, component: str):
        raw = json.loads(gzip.decompress((release.root / component / "tensors.json.gz").read_bytes()))
        dtype = SAFETENSORS_DTYPES[raw["dtype"]]
        self.path = Path(release.repo) / component / raw["file"]
        self.metadata: dict[str, str] = {}
        self.refs = {name: TensorRef(self.path, dtype, tuple(shape), 0, _numel(shape) * dtype.itemsize)
                     for name, shape in raw["tensors"]}
        self.repo = release.repo

    def tensor(self, name: str) -> torch.Tensor:
        raise CheckpointError(f"{self.repo} is not downloaded: its shapes plan a run, its weights are not here; "
                              f"download it (hf download {self.repo} --local-dir DIR) and pass --model-dir DIR")

    read = tensor


def shapes_source(release: Release, component: str) -> WeightSource:
    return WeightSource([ShapesFile(release, component)], f"{release.repo}/{component}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
