"""Everything a run writes: the video, its sidecar, the resume checkpoint, --save-latents and the live preview
(--preview N; rewritten by the run, so an earlier run's preview of the same video is replaced), from their names to
the files.

Decided before any heavy work: the paths must differ from each other and from every input (model files, latents
to decode, profile, a prompts file); an existing file is kept unless --overwrite (a default name is made unique
instead); a resume checkpoint left by an earlier run is never discarded silently (--resume continues it,
--overwrite starts again). Missing folders are created. Temp files that killed runs left behind are removed.

Runs that meet never lose a video: each run claims its output name for its whole length (fsutil.claim), so a
second run of the same --output stops before any work and a default name moves on to the next free one; the final
placement of the video, its sidecar and --save-latents only succeeds where the name is still free (a hard link),
so even a writer that does not claim names is never replaced silently.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import preflight
from .resume import checkpoint_path, save_checkpoint, save_latents, saved_request
from ..errors import StepVideoError
from ..files.caches import COMPONENTS
from ..files.preview_file import preview_path
from ..files.fsutil import Claim, claim, clean_orphans, files_under, holder
from ..files.video import VideoError, output_path_error, sidecar_path, write_mp4, write_sidecar
from ..planning.budgets import this_card
from ..planning.estimate import estimate_run
from ..planning.verdict import estimate_seconds
from ..profiles import describe

RESULTS = Path("results")
VIDEO_SUFFIX = ".mp4"
NAME_BYTES = 100   # of a prompt-derived name part (UTF-8): with the suffixes and a temp file's prefix, < 255


class OutputError(StepVideoError, ValueError):
    """An output path that would destroy an input or another output, or an existing file; one line."""


@dataclass
class RunOutputs:
    output: Path
    sidecar: Path
    checkpoint: Path | None       # None when only decoding
    save_latents: Path | None
    default: bool = False         # the video's name was made here (a taken name moves on to the next free one)
    replaceable: frozenset = frozenset()   # the paths this run may write over (--overwrite, resumed latents)
    claim: Claim | None = field(default=None, repr=False, compare=False)
    preview: Path | None = None   # the live preview (--preview N), rewritten while the run denoises

    def labelled(self) -> dict[str, Path]:
        paths = {"--output": self.output, "its sidecar": self.sidecar, "the resume checkpoint": self.checkpoint,
                 "--save-latents": self.save_latents, "its preview": self.preview}
        return {k: v for k, v in paths.items() if v is not None}

    def release(self) -> None:
        """The run ended: its output name is free for others."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def unclaimed(self) -> RunOutputs:
        """A copy without the claim (to send to the other processes of a parallel run)."""
        return dataclasses.replace(self, claim=None)


# ---- names -------------------------------------------------------------------------------------------------------

def default_name(prompt: str, now: datetime.datetime | None = None) -> str:
    """`<first words of the prompt>-<time>.mp4` (see name_words)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{name_words(prompt) or 'video'}-{stamp}{VIDEO_SUFFIX}"


def name_words(text: str, limit: int = 50) -> str:
    """The start of a prompt as a file-name part: letters, digits and marks of every script (Chinese included),
    '-' and '_'; every run of anything else (spaces, punctuation, path separators, control characters) becomes
    one '_'. At most `limit` characters and NAME_BYTES bytes of UTF-8; never starts with '-'."""
    text = unicodedata.normalize("NFC", text)[:limit]
    kept = "".join(c if c in "-_" or unicodedata.category(c)[0] in "LNM" else "\0" for c in text)
    name = re.sub("\0+", "_", kept).strip("_").lstrip("-")
    while len(name.encode("utf-8")) > NAME_BYTES:
        name = name[:-1]
    return name.strip("_")


def _taken(path: Path, decode_only: bool) -> bool:
    return any(q.exists() for q in (path, sidecar_path(path), None if decode_only else checkpoint_path(path),
                                    None if decode_only else preview_path(path)) if q)


def unique(path: Path, decode_only: bool = False) -> tuple[Path, Claim]:
    """`path`, or `name-2.mp4`, `name-3.mp4`... the first whose video, sidecar and checkpoint are all free and that
    no other running process has claimed; claimed for this run."""
    candidate, n = path, 1
    while True:
        if not _taken(candidate, decode_only):
            held = claim(candidate)
            if held is not None:
                if not _taken(candidate, decode_only):   # written between the look and the claim
                    return candidate, held
                held.release()
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")


# ---- planning ----------------------------------------------------------------------------------------------------

def plan_outputs(output: Path | None, prompt: str | None = None, save_latents: Path | None = None,
                 inputs: list[Path] = (), model_root: Path | None = None, overwrite: bool = False,
                 resume: bool = False, decode_from: Path | None = None, request: dict | None = None,
                 preview: bool = False) -> RunOutputs:
    """The output paths of a run, checked and claimed; raises OutputError (one line). `decode_from`:
    --decode-latents. `preview`: the run writes a live preview next to the video. `request` (the run's resume fingerprint): with resume, a --save-latents file an interrupted
    run wrote for the same request is written again instead of refused."""
    default = output is None
    if default:
        base = decode_from.with_suffix(VIDEO_SUFFIX) if decode_from else RESULTS / default_name(prompt or "")
        _writable(base)   # the folder exists before names are claimed in it
        output, held = unique(base, decode_only=decode_from is not None)
    else:
        output, held = Path(output), None
    outs = RunOutputs(output, sidecar_path(output), None if decode_from else checkpoint_path(output),
                      Path(save_latents) if save_latents else None, default, claim=held,
                      preview=preview_path(output) if preview and not decode_from else None)
    try:
        _check_distinct(outs.labelled())
        _check_inputs(outs.labelled(), list(inputs) + ([decode_from] if decode_from else []),
                      model_files(model_root) if model_root else [])
        if output.suffix.lower() != VIDEO_SUFFIX and not output.is_dir():   # a folder: _writable says so
            raise OutputError(f"--output {output}: only MP4 video (H.264) is written; give a name ending in .mp4, "
                              f"e.g. {output.with_suffix(VIDEO_SUFFIX).name}")
        for path in outs.labelled().values():
            _writable(path)
        if not default:
            outs.claim = _claim_given(output)
        outs.replaceable = _check_existing(outs, overwrite, resume, request)
    except BaseException:
        outs.release()
        raise
    for folder in {p.parent for p in outs.labelled().values()}:
        clean_orphans(folder)
    return outs


def _writable(path: Path) -> None:
    """Missing folders are created; a place where nothing can be written is refused."""
    problem = output_path_error(path, create_dirs=True)
    if problem:
        raise OutputError(problem)


def _claim_given(output: Path) -> Claim:
    held = claim(output)
    if held is None:
        raise OutputError(f"another run ({holder(output)}) is writing {output} now; wait for it to end or choose "
                          "another --output")
    return held


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


def same_file(a: Path, b: Path) -> bool:
    """Would writing `a` replace `b` (the same name, a symlink to it, or a hard link)?"""
    return bool(_identities(a) & _identities(b))


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


def _check_existing(outs: RunOutputs, overwrite: bool, resume: bool, request: dict | None) -> frozenset:
    """The paths this run may write over; an existing file it may not is refused."""
    if overwrite:
        return frozenset(outs.labelled().values())
    replaceable = {p for p in (outs.checkpoint, outs.preview) if p}
    for label, path in outs.labelled().items():
        if path == outs.preview:
            continue   # the video's own companion (an interrupted run's preview of it): rewritten
        if path == outs.checkpoint:
            if path.exists() and not resume:
                raise OutputError(f"{path} holds the denoising of an earlier run to {outs.output.name}; pass "
                                  "--resume to continue it or --overwrite to start again")
        elif path == outs.save_latents and resume and path.exists() and _same_request(saved_request(path), request):
            replaceable.add(path)   # an interrupted run's own latents: written again, identical
        elif path.exists():
            raise OutputError(f"{label} {path} already exists; pass --overwrite to replace it or choose another name")
    return frozenset(replaceable)


def _same_request(saved: dict | None, request: dict | None) -> bool:
    """The same request and weights; the preset may differ (the earlier run may have stepped down on OOM)."""
    if saved is None or request is None:
        return False
    return {k: v for k, v in saved.items() if k != "preset"} == {k: v for k, v in request.items() if k != "preset"}


# ---- writing -----------------------------------------------------------------------------------------------------

def job_metadata(job, request) -> dict:
    """The sidecar's description of what was asked and what ran (`request`: after any step-down); 'request' is
    what a rerun compares (see finished_sidecar)."""
    spec, preset = job.spec, request.preset
    return {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
            "preset": str(preset), "steps": preset.steps, "guidance_scale": request.guidance_scale,
            "shift": request.shift, "turbo": job.turbo, "text_from_cache": job.text_cached,
            "arguments": spec_arguments(spec),
            "request": job.request.fingerprint(job.pipe.folder.root, job.pipe.profile.compute_dtype),
            "parallel": job.par.layout.describe() if job.par else None, "kind": job.pipe.kind,
            **request.describe_image(),
            **run_estimate(job.pipe, preset, job.par and job.par.layout)}


def run_estimate(pipe, preset, layout=None) -> dict:
    """The time estimate of what ran, on this machine's card, for the sidecar beside the measured timings_s
    (estimate_s: seconds per phase and total; estimate: what they assume); of one process's share under a parallel
    `layout`. None on the CPU or an unknown card."""
    try:
        est = estimate_run(pipe.folder, pipe.profile, preset, this_card()[0], pipe.options, layout)
    except (StepVideoError, RuntimeError, ValueError, OSError) as e:   # never cost the video its sidecar
        return {"estimate_s": None, "estimate": {"error": str(e).strip().splitlines()[0]}}
    return {"estimate_s": estimate_seconds(est), "estimate": None if est is None else est.to_dict()}


def spec_arguments(spec: preflight.JobSpec) -> dict:
    """The request as asked: the spec's fields, every run option (its default where not given) and the profile
    overrides. Renamed run options are written under their old names too until those go (preflight.OLD_OPTION_NAMES),
    so readers of the sidecar written for the old names keep working."""
    plain = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}   # (asdict would copy an image)
    options = plain.pop("options")
    arguments = {**plain, **preflight.run_options(spec), **options}
    arguments.update({old: arguments[new] for old, new in preflight.OLD_OPTION_NAMES.items()})
    return {k: _plain(v) for k, v in arguments.items()}


def _plain(value):
    """A JSON value for the sidecar: numbers as they are, an in-memory image or tensors (the API's) as their type,
    anything else as text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    tensors = value if isinstance(value, (tuple, list)) else [value]
    if any(hasattr(v, "shape") or hasattr(v, "mode") for v in tensors):
        return f"<{type(value).__name__}>"
    return str(value)


def write_outputs(outs: RunOutputs, frames, pipe, meta: dict, seconds: float, log) -> Path:
    """The mp4 and its sidecar, placed where the names are free (see the module docstring); returns the video's
    path (another than planned only for a default name taken meanwhile)."""
    replace = outs.output in outs.replaceable
    try:
        info = write_mp4(frames, outs.output, replace=replace,
                         next_name=_next_free(outs, log) if outs.default else None)
    except FileExistsError:
        raise OutputError(f"{outs.output} was created by another program while this run worked; it is kept and "
                          "this video was not written") from None
    output = Path(info["path"])
    if info.get("padded"):
        log("note: odd frame size padded by one pixel for H.264 (yuv420p needs even sizes)")
    meta = {**meta, "model_dir": str(pipe.folder.root), "weight_format": pipe.folder.weight_format,
            "frames": int(frames.shape[0]), "size": [int(frames.shape[1]), int(frames.shape[2])],
            "fps": info["fps"], "width": info["width"], "height": info["height"],   # of the mp4 as written
            "duration_s": round(info["frames"] / info["fps"], 3),
            "profile": describe(pipe.profile), "speed": pipe.speed,
            "timings_s": {k: round(v, 2) for k, v in {"text": 0.0, **pipe.timings}.items()},   # text 0: cached
            "total_s": round(seconds, 2), "peak_vram_bytes": _peak_vram(pipe.device),
            "peak_host_bytes": _peak_host(), "torch": torch.__version__}
    try:
        write_sidecar(sidecar_path(output), meta, replace=replace)
    except FileExistsError:
        raise VideoError(f"{output} is written, but its sidecar {sidecar_path(output)} was created by another "
                         "program meanwhile; it is kept") from None
    log(f"wrote {output.resolve()} ({meta['frames']}x{info['height']}x{info['width']} frames x height x width, "
        f"{info['fps']} fps) and {sidecar_path(output).resolve()}")
    return output


def save_checkpoint_or_warn(ckpt: Path, latents: torch.Tensor, step: int, fingerprint: dict, log) -> bool:
    """Save a resume checkpoint (over the last one); a failed write (disk full: an OSError, or the SafetensorError
    safetensors raises for it) keeps the previous one, says so, and the run goes on: False."""
    try:
        save_checkpoint(ckpt, latents, step, fingerprint)
        return True
    except Exception as e:   # whatever the writer raises: the checkpoint is a spare, the run is what matters
        kept = f"the previous checkpoint in {ckpt} is kept" if ckpt.is_file() else "no checkpoint is kept"
        log(f"warning: could not save the checkpoint after step {step} ({_reason(e)}); {kept}")
        return False


def save_final_latents(outs: RunOutputs, latents: torch.Tensor, fingerprint: dict) -> None:
    """--save-latents: the final latents with the request and weights they came from (for --decode-latents),
    never over a file another process put there meanwhile."""
    path = outs.save_latents
    try:
        save_latents(path, latents, fingerprint, replace=path in outs.replaceable)
    except FileExistsError:
        raise OutputError(f"--save-latents {path} was created by another program while this run worked; it is "
                          "kept") from None
    except Exception as e:   # OSError, or safetensors' own error for a full disk
        raise OutputError(f"could not write --save-latents {path} ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """One line for a failed write: the OS's words (No space left on device) or the error's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _next_free(outs: RunOutputs, log) -> Callable[[Path], Path]:
    def next_name(taken: Path) -> Path:
        path, held = unique(taken, decode_only=outs.checkpoint is None)
        outs.release()
        outs.claim = held
        log(f"note: {taken.name} was created by another program meanwhile; writing {path.name} instead")
        return path
    return next_name


def _peak_vram(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _peak_host() -> int | None:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes); None where unknown."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def finished_sidecar(output: Path, request: dict) -> dict | None:
    """The sidecar of `output` when the video and its sidecar exist and were made for `request` (the resume
    fingerprint of the request as asked, which holds the identity of the weights); None otherwise."""
    try:
        meta = json.loads(sidecar_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not Path(output).is_file():
        return None
    return meta if meta.get("request") == request else None
