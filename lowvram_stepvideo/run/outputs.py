"""The files a run writes: the video, its sidecar, the resume checkpoint and --save-latents.

Decided before any heavy work: the paths must differ from each other and from every input (model files, latents
to decode, profile); an existing file is kept unless --overwrite (a default name is made unique instead); a resume
checkpoint left by an earlier run is never discarded silently (--resume continues it, --overwrite starts again).
Temp files that killed runs left in the output folders are removed.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StepVideoError
from ..files.fsutil import clean_orphans, files_under
from ..files.caches import COMPONENTS
from .resume import checkpoint_path
from ..files.video import output_path_error, sidecar_path

RESULTS = Path("results")


class OutputError(StepVideoError, ValueError):
    """An output path that would destroy an input or another output, or an existing file; one line."""


@dataclass(frozen=True)
class RunOutputs:
    output: Path
    sidecar: Path
    checkpoint: Path | None       # None when only decoding
    save_latents: Path | None

    def labelled(self) -> dict[str, Path]:
        paths = {"--output": self.output, "its sidecar": self.sidecar, "the resume checkpoint": self.checkpoint,
                 "--save-latents": self.save_latents}
        return {k: v for k, v in paths.items() if v is not None}


def default_name(prompt: str, now: datetime.datetime | None = None) -> str:
    """`<first words of the prompt>-<time>.mp4`: letters, digits, '-' and '_' only (no spaces)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{name_words(prompt) or 'video'}-{stamp}.mp4"


def name_words(text: str, limit: int = 50) -> str:
    """The start of a prompt as a file-name part: ASCII letters, digits, '-' and '_' only."""
    return re.sub(r"[^\w-]+", "_", text[:limit], flags=re.ASCII).strip("_")


def unique(path: Path, decode_only: bool = False) -> Path:
    """`path`, or `name-2.mp4`, `name-3.mp4`... the first whose video, sidecar and checkpoint are all free."""
    def taken(p: Path) -> bool:
        return any(q.exists() for q in (p, sidecar_path(p), None if decode_only else checkpoint_path(p)) if q)
    candidate, n = path, 1
    while taken(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def plan_outputs(output: Path | None, prompt: str | None = None, save_latents: Path | None = None,
                 inputs: list[Path] = (), model_root: Path | None = None, overwrite: bool = False,
                 resume: bool = False, decode_from: Path | None = None) -> RunOutputs:
    """The output paths of a run, checked; raises OutputError (one line). `decode_from`: --decode-latents."""
    default = output is None
    if default:
        output = unique(decode_from.with_suffix(".mp4") if decode_from else RESULTS / default_name(prompt or ""),
                        decode_only=decode_from is not None)
    outs = RunOutputs(Path(output), sidecar_path(output), None if decode_from else checkpoint_path(output),
                      Path(save_latents) if save_latents else None)
    _check_distinct(outs.labelled())
    _check_inputs(outs.labelled(), list(inputs) + ([decode_from] if decode_from else []),
                  model_files(model_root) if model_root else [])
    for label, path in outs.labelled().items():
        problem = output_path_error(path, create_dirs=default and label != "--save-latents")
        if problem:
            raise OutputError(problem)
    _check_existing(outs, overwrite, resume)
    for folder in {p.parent for p in outs.labelled().values()}:
        clean_orphans(folder)
    return outs


def model_files(root: Path) -> list[Path]:
    """Every file a model folder is made of (component folders followed through symlinks)."""
    root = Path(root)
    files = [p for p in root.iterdir() if p.is_file()] if root.is_dir() else []
    return files + [f for name in COMPONENTS for f in files_under(root / name)]


def _entry(path: Path) -> Path:
    """The directory entry a write replaces (the name in its real folder, not a symlink's target)."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


def _identities(path: Path) -> set:
    path = Path(path)
    ids = {_entry(path), path.resolve()}
    try:
        st = os.stat(path)
        ids.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    return ids


def _check_distinct(paths: dict[str, Path]) -> None:
    seen: dict = {}
    for label, path in paths.items():
        for ident in _identities(path):
            if ident in seen and seen[ident] != label:
                raise OutputError(f"{label} {path} is the same file as {seen[ident]}; give each output its own "
                                  "file name")
            seen[ident] = label


def _check_inputs(outputs: dict[str, Path], inputs: list[Path], model: list[Path]) -> None:
    read = {ident: f"input {p}" for p in inputs for ident in _identities(p)}
    read.update({ident: f"model file {p}" for p in model for ident in _identities(p)})
    for label, path in outputs.items():
        hit = next((read[i] for i in _identities(path) if i in read), None)
        if hit:
            raise OutputError(f"{label} {path} would overwrite the {hit}; choose another output path")


def _check_existing(outs: RunOutputs, overwrite: bool, resume: bool) -> None:
    if overwrite:
        return
    for label, path in outs.labelled().items():
        if path == outs.checkpoint:
            if path.exists() and not resume:
                raise OutputError(f"{path} holds the denoising of an earlier run to {outs.output.name}; pass "
                                  "--resume to continue it or --overwrite to start again")
        elif path.exists():
            raise OutputError(f"{label} {path} already exists; pass --overwrite to replace it or choose another name")
