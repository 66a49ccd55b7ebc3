"""One generation request run to the end: pick a preset that fits, denoise with checkpoints, step down on OOM.

`run_job(spec, events)` is the whole run behind generate.py, the Python API, batches and the job queue:
pre-flight (preflight.py), the memory plan and preset ladder, the text phase (text-embedding cache), denoising with
checkpoints and OOM step-down, decode, mp4 + sidecar.

- Before a GPU run, the memory plan picks the largest preset of the ladder that fits the card.
- The prompt is encoded once; an out-of-memory error there retries with step_llm streamed block by block.
- A lowered profile (the memory plan's, the text encoders' fallback) runs through `PhasePipeline.with_profile`: a
  pipeline is never changed under whoever holds it.
- An out-of-memory error while denoising frees everything and retries with the next smaller preset (same number of
  steps); decoding handles its own OOM with smaller tiles.
- Every `checkpoint_every` steps, and after the last one, the latents are saved atomically next to the output (so a
  failed decode does not cost the denoising); Ctrl-C, or `events.should_stop()` after a step, saves and stops.

Grad mode is off with torch.no_grad(), not inference_mode(): block streaming fills its buffers in a worker thread,
where inference mode is off, and such a thread may not write into tensors made under inference mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import outputs, preflight, results
from ..engines import parallel
from ..pipeline import progress
from ..errors import StepVideoError, UsageError
from ..loading.model_folder import ModelFolder
from ..engines.parallel import LostRank, Parallel
from ..pipeline.parallel_machine import ParallelRuntime
from ..pipeline.phases import PhasePipeline
from .preflight import JobSpec
from ..profiles import Preset, Profile, TextEncoders, ladder_from
from .resume import (
    check_step_latents,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    saved_request,
    weights_identity)
from .resume import save_latents as save_latents_file
from ..defaults import sampling_defaults
from ..pipeline.sampling import flow_sigmas, initial_noise, latent_shape, sampling_problem
from ..planning.fit import clamped, first_fit, profile_budget
from ..files.video import postprocess

_OOM = torch.OutOfMemoryError
GiB = 2**30


class Interrupted(StepVideoError):
    """Ctrl-C (or a stop request) during denoising; the latents were saved to `path`."""

    def __init__(self, path: Path, step: int):
        super().__init__(f"interrupted after step {step}; saved to {path} (continue with --resume)")
        self.path, self.step = path, step


class OutOfMemory(StepVideoError):
    """Out of memory at every preset of the ladder (or in the text encoders even streamed)."""


class _StopRequested(Exception):
    """events.should_stop() said yes after a denoising step."""


@dataclass
class Request:
    prompt: str
    negative_prompt: str | None
    preset: Preset
    guidance_scale: float
    shift: float
    seed: int

    def fingerprint(self, model_dir: Path, compute_dtype: str) -> dict:
        """What a resume checkpoint must match: the whole request and the identity of the weights."""
        return {"weights": weights_identity(model_dir), "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "preset": str(self.preset), "steps": self.preset.steps, "guidance_scale": self.guidance_scale,
                "shift": self.shift, "seed": self.seed, "compute_dtype": compute_dtype}


def resume_ladder(ladder: list[Preset], ckpt: Path) -> list[Preset]:
    """The ladder from the preset the checkpoint was saved at (an earlier run may have stepped down on OOM)."""
    saved = saved_request(ckpt)
    at = [i for i, p in enumerate(ladder) if saved and str(p) == saved.get("preset")]
    return ladder[at[0]:] if at else ladder


def fit_to_card(pipe: PhasePipeline, ladder: list[Preset], vram_bytes: int | None = None,
                log: Callable[[str], None] = print, ram_bytes: int | None = None,
                layout=None) -> tuple[list[Preset], Profile]:
    """The ladder without its head presets the memory plan says do not fit the budget (planning/budgets.py: this
    machine's free VRAM and available RAM minus their reserves, or a card of `vram_bytes` in a machine with
    `ram_bytes`), and pipe's profile with its resident blocks and packed RAM lowered to what fits (`pipe` is left as
    it is: run the result with `pipe.with_profile`). `layout` (engines.parallel.Layout): plan this rank's share of
    a parallel run."""
    budget = profile_budget(pipe.profile, vram_bytes, ram_bytes)
    asked = clamped(pipe.folder, pipe.profile)      # a count above the stack's size is not a lowering
    tried: dict = {}
    found = first_fit(pipe.folder, pipe.profile, ladder, budget, tried, pipe.options, layout)
    if found is None:
        log(f"plan: even {ladder[-1]} is planned above the budget ({budget.vram_from}; {budget.host_from}); "
            "trying it anyway")
        return ladder[-1:], pipe.profile
    profile, plan = tried[found]
    if found:
        log(f"plan: {ladder[0]} does not fit ({budget.vram_from}); using {ladder[found]}")
    if profile.dit.resident_blocks < asked.dit.resident_blocks:
        log(f"plan: DiT resident blocks lowered from {asked.dit.resident_blocks} to {profile.dit.resident_blocks} "
            "to fit")
    if profile.vae.tile == 0 and pipe.profile.vae.tile:
        log("plan: the VAE decode fits untiled (the release's numerics, no tile seams)")
    if profile.memory.packed_gb < pipe.profile.memory.packed_gb:
        log(f"plan: packed host RAM lowered from {pipe.profile.memory.packed_gb:g} to {profile.memory.packed_gb:.1f} "
            f"GiB to fit ({budget.host_from}); the other blocks are read from disk")
    log(f"plan: {plan.peak_vram_bytes / GiB:.1f} GiB device and {plan.peak_host_bytes / GiB:.1f} GiB host peak, "
        f"{profile.dit.resident_blocks} DiT blocks resident")
    return ladder[found:], profile


def check_resumable(pipe: PhasePipeline, request: Request, ladder: list[Preset], ckpt: Path) -> None:
    """A missing or mismatched checkpoint is refused before any heavy work."""
    first = dataclasses.replace(request, preset=ladder[0])
    load_checkpoint(ckpt, first.fingerprint(pipe.folder.root, pipe.profile.compute_dtype),
                    _shape(pipe, first.preset), first.preset.steps)


def denoise_with_fallback(pipe: PhasePipeline, request: Request, ladder: list[Preset], ckpt: Path | None,
                          resume: bool, every: int, embeds, should_stop: Callable[[], bool] | None = None,
                          par: Parallel | None = None) -> tuple[torch.Tensor, Preset]:
    """Final latents and the preset that produced them from the prompt's `embeds` (encode_with_fallback).
    With `par` (several processes): only rank 0 saves checkpoints, and an out-of-memory error steps every rank
    down together (a rank whose peers did not fail with it ends the run at the collective timeout instead)."""
    problem = sampling_problem(request.guidance_scale, request.shift, request.seed)
    if problem:
        raise ValueError(problem)
    if resume and ckpt is not None:
        check_resumable(pipe, request, ladder, ckpt)
    for i, preset in enumerate(ladder):
        req = dataclasses.replace(request, preset=preset)
        try:
            return denoise(pipe, req, embeds, ckpt, resume and i == 0, every, should_stop,
                           par is None or par.writer), preset
        except _OOM:
            pass  # handled outside the except block, so the failed attempt's tensors can be freed
        _free(pipe)
        if par is not None:
            par.all_agree(False)   # every rank ran out of memory at this preset: step down together
        if i + 1 == len(ladder):
            raise OutOfMemory(f"out of memory even at {preset}; use a smaller --profile or free GPU memory")
        pipe.log(f"denoise: out of memory at {preset}; memory freed, retrying at {ladder[i + 1]}")
    raise AssertionError("empty ladder")


def denoise(pipe: PhasePipeline, req: Request, embeds, ckpt: Path | None, resume: bool,
            every: int, should_stop: Callable[[], bool] | None = None, save: bool = True) -> torch.Tensor:
    """Latents after the request's steps; a stop request after a step (or Ctrl-C) saves them to `ckpt` and raises
    Interrupted. `save`: this process writes the checkpoints (False on every rank but 0 of a parallel run)."""
    shape = _shape(pipe, req.preset)
    fingerprint = req.fingerprint(pipe.folder.root, pipe.profile.compute_dtype)
    latents, start = initial_noise(shape, req.seed), 0
    if resume and ckpt is not None:
        latents, start = load_checkpoint(ckpt, fingerprint, shape, req.preset.steps)
        pipe.log(f"resuming at step {start} of {req.preset.steps} from {ckpt}")
        if start >= req.preset.steps:
            return latents   # denoising had finished (the decode failed): nothing to load the DiT for
    state = {"step": start, "latents": latents}

    def on_step(done: int, current: torch.Tensor) -> None:
        check_step_latents(current, done, req.preset.steps, ckpt)   # before anything is saved from them
        state.update(step=done, latents=current)
        if save and ckpt is not None and every and (done % every == 0 or done == req.preset.steps):
            _save(pipe, ckpt, current, done, fingerprint)
        if should_stop and should_stop() and done < req.preset.steps and ckpt is not None:
            raise _StopRequested   # saved and turned into Interrupted below, like Ctrl-C

    sigmas = flow_sigmas(req.preset.steps, req.shift)
    try:
        with torch.no_grad():
            return pipe.denoise(embeds, latents, sigmas, req.guidance_scale, start, on_step)
    except (KeyboardInterrupt, _StopRequested):
        if ckpt is None or not save:
            raise
        if not _save(pipe, ckpt, state["latents"], state["step"], fingerprint):
            raise KeyboardInterrupt from None   # nothing new saved: stopped like a plain Ctrl-C
        raise Interrupted(ckpt, state["step"]) from None
    except LostRank as e:
        if ckpt is None or not save or state["step"] == start or \
                not _save(pipe, ckpt, state["latents"], state["step"], fingerprint):
            raise
        raise LostRank(f"{e}; the latents after step {state['step']} are saved in {ckpt}: "
                       "run the same command with --resume") from None


def _shape(pipe: PhasePipeline, preset: Preset) -> tuple[int, ...]:
    return latent_shape(preset.frames, preset.height, preset.width, channels=pipe.latent_channels()).shape


def _save(pipe: PhasePipeline, ckpt: Path, latents: torch.Tensor, step: int, fingerprint: dict) -> bool:
    """Save a checkpoint; a failed write (disk full) keeps the previous one and the run goes on."""
    try:
        save_checkpoint(ckpt, latents, step, fingerprint)
        return True
    except OSError as e:
        kept = f"the previous checkpoint in {ckpt} is kept" if ckpt.is_file() else "no checkpoint is kept"
        pipe.log(f"warning: could not save the checkpoint after step {step} ({e.strerror or e}); {kept}")
        return False


def encode_with_fallback(pipe: PhasePipeline, req: Request) -> tuple[tuple, PhasePipeline]:
    embeds, pipe = encode_all_with_fallback(pipe, [(req.prompt, req.negative_prompt)])
    return embeds[0], pipe


def encode_all_with_fallback(pipe: PhasePipeline, prompts: list[tuple[str, str | None]]) -> tuple[list, PhasePipeline]:
    """One text phase for all (prompt, negative prompt) pairs as the profile says; on OOM once more with step_llm
    streamed block by block. The embeddings, and the pipeline that made them (`pipe`, or one with the streamed
    text encoders)."""
    for attempt in range(2):
        try:
            with torch.no_grad():
                return pipe.encode_prompts(prompts), pipe
        except _OOM:
            pass  # handled outside the except block, so the failed attempt's tensors can be freed
        _free(pipe)
        te = pipe.profile.text_encoders
        if attempt or (te.placement == "stream" and te.resident_blocks == 0):
            break
        pipe.log("out of memory in the text encoders; retrying with step_llm streamed block by block")
        streamed = TextEncoders(placement="stream", resident_blocks=0, prefetch=max(1, te.prefetch),
                                source=te.source)
        pipe = pipe.with_profile(dataclasses.replace(pipe.profile, text_encoders=streamed))
    raise OutOfMemory("out of memory in the text encoders even with step_llm streamed; free GPU memory")


def _free(pipe: PhasePipeline) -> None:
    pipe.runtime.free()


# ---- one job end to end ------------------------------------------------------------------------------------------

def say(msg: str) -> None:
    """A line on stderr; an open progress bar is cleared first and redrawn below it."""
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


class Events:
    """What a run reports while it goes, and asks once per denoising step. This default logs to `log` (stderr)
    and never stops; the job queue and the web page pass their own."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self._log = log or say

    def phase(self, name: str) -> None:
        """A phase starts: plan, text, denoise, decode, write."""

    def progress(self, desc: str, done: int, total: int | None) -> None:
        """Every progress bar's state (step_llm blocks, denoising steps, decoded tiles)."""

    def log(self, msg: str) -> None:
        self._log(msg)

    def should_stop(self) -> bool:
        return False


@contextlib.contextmanager
def one_line_oom():
    """An out-of-memory error no fallback handled (e.g. placing the VAE) as OutOfMemory with a one-line message."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OutOfMemory(f"out of memory: {what}; use a smaller --profile or free GPU memory") from None


@dataclass
class JobResult:
    output: Path | None            # None on the ranks but 0 of a parallel run (rank 0 writes)
    preset: Preset                 # what ran, after any OOM step-down
    timings: dict[str, float]      # seconds per phase: text, denoise, decode
    seconds: float                 # the whole run


@dataclass
class PreparedJob:
    spec: JobSpec
    pipe: PhasePipeline
    request: Request
    output: Path | None            # the mp4 (None: frames returned to the caller, nothing written)
    checkpoint: Path | None        # the resume checkpoint (next to the output by default)
    options: dict                  # preflight.RUN_OPTIONS with the spec's values
    turbo: bool
    par: Parallel | None = None    # this process's place in a torchrun launch (None: it runs alone)


def run_job(spec: JobSpec, events: Events | None = None) -> JobResult:
    """One video from `spec` to mp4 + sidecar; raises StepVideoError subclasses (Interrupted when stopped)."""
    events = events or Events()
    with progress.listen(events.progress):
        return execute(prepare_job(spec, events.log), events)


def prepare_job(spec: JobSpec, log: Callable[[str], None], folder: ModelFolder | None = None,
                writes_video: bool = True) -> PreparedJob:
    """Pre-flight: the request (see prepare_request), then the files it writes, planned by outputs.py (an existing
    file is kept unless overwrite; a checkpoint left by an earlier run needs resume or overwrite). Without
    writes_video only the checkpoint option is a file. Nothing heavy is loaded."""
    job = prepare_request(spec, log, folder)
    options, par = job.options, job.par
    if not writes_video:
        job.checkpoint = Path(options["checkpoint"]) if options["checkpoint"] else None
        if job.checkpoint:
            preflight.check_writable(job.checkpoint)
        return job
    earlier = checkpoint_path(spec.output) if spec.output else None
    planned = problem = None
    if par is None or par.writer:   # only rank 0 writes; a default name has its time stamp
        try:
            planned = outputs.plan_outputs(spec.output, prompt=spec.prompt, save_latents=options["save_latents"],
                                           inputs=[job.pipe.profile.path], model_root=job.pipe.folder.root,
                                           overwrite=options["overwrite"], resume=wants_resume(options, earlier))
        except StepVideoError as e:
            problem = e
    if par is not None:
        planned, problem = par.broadcast_from_writer((planned, problem and str(problem)))
    if problem:
        raise problem if isinstance(problem, StepVideoError) else UsageError(problem)
    job.output, job.checkpoint = planned.output, planned.checkpoint
    return job


def prepare_request(spec: JobSpec, log: Callable[[str], None], folder: ModelFolder | None = None) -> PreparedJob:
    """Folder (unless already opened), profile and device (its explicit kernels probed), sizes and numbers; no output
    paths yet."""
    folder = folder or preflight.model_folder(spec)
    profile = preflight.profile_for(spec, log=log)
    note_weight_format(folder, profile, log)
    preflight.check_numbers(spec)
    options = preflight.run_options(spec)
    turbo = bool(options["turbo"] or folder.turbo)
    defaults = sampling_defaults(turbo)
    preset = preflight.preset_for(spec, profile, defaults["steps"] if turbo else None, log)
    request = Request(spec.prompt, spec.negative_prompt, preset,
                      defaults["guidance_scale"] if spec.guidance_scale is None else spec.guidance_scale,
                      defaults["shift"] if spec.shift is None else spec.shift, spec.seed)
    par = parallel_for(options["parallel"], profile)
    preflight.check_kernels(profile, folder.weight_format, par)
    if par is None:
        pipe = PhasePipeline(folder, profile, log=log, options=preflight.speed_options(spec))
    else:
        log = log if par.writer else (lambda msg: None)   # one copy of each message, from rank 0
        log(f"parallel: {par.layout.describe()}")
        runtime = ParallelRuntime(folder, profile, par, log)
        pipe = PhasePipeline(folder, profile, log=log, progress=par.writer, runtime=runtime,
                             options=preflight.speed_options(spec))
    return PreparedJob(spec, pipe, request, None, None, options, turbo, par)


_JOINED: dict[str, Parallel] = {}   # the process group is joined once per process (a batch runs several jobs)


def parallel_for(mode: str | None, profile) -> Parallel | None:
    """This process's place in a torchrun launch (None when it runs alone); `mode`: "cfg" | "sequence" | "auto"."""
    if not parallel.launched_by_torchrun():
        if mode:
            raise UsageError(f"--parallel {mode} needs several processes: launch with "
                             "torchrun --nproc-per-node N generate.py ... (one GPU per process)")
        return None
    mode = mode or "auto"
    if mode not in _JOINED:
        if _JOINED:
            raise UsageError(f"--parallel {mode}: this process already runs --parallel {next(iter(_JOINED))}")
        _JOINED[mode] = parallel.init_from_env(mode, profile.device)
    return _JOINED[mode]


def wants_resume(options: dict, ckpt: Path | None) -> bool:
    """resume True, or "auto" and a checkpoint is there."""
    return options["resume"] is True or (options["resume"] == "auto" and ckpt is not None and ckpt.is_file())


def note_weight_format(folder, profile, log) -> None:
    if folder.weight_format != profile.weight_format and profile.device == "cuda":
        log(f"note: profile {profile.name} is sized for {profile.weight_format} weights and this folder has "
            f"{folder.weight_format}; the memory plan accounts for it"
            + (" (python quantize.py ... --format int8 halves the weights)" if folder.weight_format == "bf16" else ""))


def execute(job: PreparedJob, events: Events) -> JobResult:
    start = time.perf_counter()
    latents, used = denoise_job(job, events)
    if job.par is not None and not job.par.writer:   # rank 0 decodes and writes
        return JobResult(None, used, dict(job.pipe.timings), time.perf_counter() - start)
    request = dataclasses.replace(job.request, preset=used)
    try:
        if job.options["save_latents"]:
            save_latents(Path(job.options["save_latents"]), latents, request, job.pipe)
        events.phase("decode")
        frames = decode_frames(job.pipe, latents)
        events.phase("write")
        results.write_outputs(job.output, frames, job.pipe, results.job_metadata(job, request),
                              time.perf_counter() - start, events.log)
    except BaseException:
        if job.checkpoint and job.checkpoint.is_file():
            flags = "--resume --overwrite" if job.output and job.output.exists() else "--resume"   # mp4 written?
            events.log(f"note: the denoised latents are kept in {job.checkpoint}; run the same command with "
                       f"{flags} to only decode")
        raise
    if job.checkpoint:
        job.checkpoint.unlink(missing_ok=True)
    return JobResult(job.output, used, dict(job.pipe.timings), time.perf_counter() - start)


def denoise_job(job: PreparedJob, events: Events) -> tuple[torch.Tensor, Preset]:
    """Plan, text phase, denoising (with checkpoints, OOM step-down and stop requests): final latents and the
    preset that made them. `job.pipe` becomes the pipeline that ran them (its profile lowered to what fits)."""
    pipe, options, ckpt, par = job.pipe, job.options, job.checkpoint, job.par
    writer = par is None or par.writer
    resume = ckpt is not None and wants_resume(options, ckpt)
    if options["text_cache"] and writer:   # the other ranks take rank 0's embeddings
        pipe.cache = pipe.embedding_cache(options["text_cache_dir"])
    events.phase("plan")
    ladder, pipe = plan_ladder(pipe, job.request.preset, ckpt if resume else None, events.log, par)
    if resume:
        check_resumable(pipe, job.request, ladder, ckpt)
    events.phase("text")
    embeds, pipe = encode_with_fallback(pipe, job.request) if writer else (None, pipe)
    if par is not None:
        embeds = par.broadcast_from_writer(embeds)
    events.phase("denoise")
    job.pipe = pipe
    return denoise_with_fallback(pipe, job.request, ladder, ckpt, resume, options["checkpoint_every"], embeds,
                                 events.should_stop, par)


def plan_ladder(pipe: PhasePipeline, preset: Preset, resume_from: Path | None, log,
                par: Parallel | None = None) -> tuple[list[Preset], PhasePipeline]:
    """The presets to try in order: the memory plan's fit on a GPU, or from the checkpoint's preset on resume; and
    the pipeline to run them with (`pipe`, or `pipe` with the profile the plan lowered). Under torchrun each rank
    plans its share on its own card, and all run the preset that fits the smallest."""
    ladder = ladder_from(pipe.profile.presets, preset)
    if resume_from is not None:
        return resume_ladder(ladder, resume_from), pipe
    if pipe.device.type == "cuda":
        full = ladder
        ladder, fitted = fit_to_card(pipe, ladder, None, log, layout=par and par.layout)   # free VRAM, available RAM
        pipe = pipe.with_profile(fitted)
        if par is not None:
            ladder = full[par.agree_max(len(full) - len(ladder)):]
    return ladder, pipe


def decode_frames(pipe: PhasePipeline, latents: torch.Tensor):
    with torch.no_grad():
        return postprocess(pipe.decode(latents))


def save_latents(path: Path, latents: torch.Tensor, request: Request, pipe: PhasePipeline) -> None:
    """--save-latents: the final latents with the request and weights they came from (for --decode-latents)."""
    try:
        save_latents_file(path, latents, request.fingerprint(pipe.folder.root, pipe.profile.compute_dtype))
    except OSError as e:
        raise UsageError(f"could not write --save-latents {path} ({e.strerror or e})") from None
