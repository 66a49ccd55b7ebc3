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

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import live_preview, outputs, preflight
from ..engines import parallel
from ..pipeline import progress
from ..errors import StepVideoError, UsageError
from ..loading.model_folder import ModelFolder
from ..engines.parallel import LostRank, Parallel
from ..pipeline.parallel_machine import ParallelRuntime
from ..pipeline.phases import PhasePipeline
from .oom import OutOfMemory
from .preflight import JobSpec
from .ladder import plan_ladder
from .warm import KeptDiT, keep_warm
from ..pipeline.machine import DeviceRuntime
from .request import Request, check_given, first_image
from ..profiles import Preset, TextEncoders, ladder_from
from .resume import checkpoint_path, load_checkpoint, load_latents, non_finite_latents, saved_request
from ..defaults import sampling_defaults
from ..pipeline.sampling import flow_sigmas, initial_noise, latent_shape, sampling_problem
from ..files.video import postprocess

_OOM = torch.OutOfMemoryError
GiB = 2**30


class Interrupted(StepVideoError):
    """Ctrl-C (or a stop request) during denoising, the latents saved to `path`; or during the decode, the
    denoised latents kept in `path` (step None)."""

    def __init__(self, path: Path, step: int | None):
        super().__init__(f"interrupted after step {step}; saved to {path} (continue with --resume)" if step is not None
                         else f"interrupted while decoding; the denoised latents are kept in {path}: run the same "
                              "command with --resume to only decode")
        self.path, self.step = path, step


class _StopRequested(Exception):
    """events.should_stop() said yes after a denoising step."""


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
            if par is not None:
                req.image_latents = shared_image_latents(pipe, req, par)
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
    latents, start = (initial_noise(shape, req.seed) if req.latents is None else req.latents), 0
    if resume and ckpt is not None:
        latents, start = load_checkpoint(ckpt, fingerprint, shape, req.preset.steps)
        pipe.log(f"resuming at step {start} of {req.preset.steps} from {ckpt}")
        if start >= req.preset.steps:
            return latents   # denoising had finished (the decode failed): nothing to load the DiT for
    state = {"step": start, "latents": latents}

    def non_finite(step: int) -> None:
        raise non_finite_latents(step, req.preset.steps, ckpt)

    def on_step(done: int, current: torch.Tensor) -> None:
        state.update(step=done, latents=current)
        if save and ckpt is not None and every and (done % every == 0 or done == req.preset.steps):
            _save(pipe, ckpt, current, done, fingerprint)
        if should_stop and should_stop() and done < req.preset.steps and ckpt is not None:
            raise _StopRequested   # saved and turned into Interrupted below, like Ctrl-C

    sigmas = flow_sigmas(req.preset.steps, req.shift)
    try:
        with torch.no_grad():
            condition = condition_for(pipe, req, shape)
            return pipe.denoise(embeds, latents, sigmas, req.guidance_scale, start, on_step, condition,
                                req.motion_score, non_finite)
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


def condition_for(pipe: PhasePipeline, req: Request, shape: tuple[int, ...]) -> torch.Tensor | None:
    """TI2V: the condition latents of the request's first image at its preset's size (the image phase encodes
    it; given latents are used as they are); None for T2V."""
    if pipe.kind != "ti2v":
        return None
    image = req.image.tensor(req.preset.height, req.preset.width) if req.image_latents is None else None
    return pipe.condition(shape, image, req.image_latents, req.seed)


def shared_image_latents(pipe: PhasePipeline, req: Request, par: Parallel) -> torch.Tensor | None:
    """Under torchrun, TI2V's first image is encoded once, by rank 0, and every rank takes its latent (so that
    all condition on the same bits)."""
    if pipe.kind != "ti2v" or req.image_latents is not None:
        return req.image_latents
    with torch.no_grad():
        latent = pipe.encode_image(req.image.tensor(req.preset.height, req.preset.width), req.seed) \
            if par.writer else None
    return par.broadcast_from_writer(latent)


def _shape(pipe: PhasePipeline, preset: Preset) -> tuple[int, ...]:
    return latent_shape(preset.frames, preset.height, preset.width, channels=pipe.latent_channels()).shape


def _save(pipe: PhasePipeline, ckpt: Path, latents: torch.Tensor, step: int, fingerprint: dict) -> bool:
    pipe.settle_checks()   # latents found NaN are never saved (the check may still be pending on the device)
    return outputs.save_checkpoint_or_warn(ckpt, latents, step, fingerprint, pipe.log)


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

    def preview(self, record: dict) -> None:
        """A live preview was written: path, frames, width, height, bytes, step (steps done), seconds."""

    preview_frames = None   # a run that writes no video: (steps done, uint8 frames (F, H, W, 3)) of each preview


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
    outputs: outputs.RunOutputs | None = None   # what it writes, claimed for the run (see release)
    text_cached: bool = False      # the prompt's embeddings came from the cache (no text phase ran)

    def release(self) -> None:
        """The run ended (or was only checked): its output names are free for other runs."""
        if self.outputs is not None:
            self.outputs.release()


def run_job(spec: JobSpec, events: Events | None = None, kept: KeptDiT | None = None) -> JobResult:
    """One video from `spec` to mp4 + sidecar; raises StepVideoError subclasses (Interrupted when stopped).
    `kept`: the DiT kept between the videos of a batch, the web page or an API session (run/warm.py)."""
    events = events or Events()
    with progress.listen(events.progress):
        job = prepare_job(spec, events.log, kept=kept)
        try:
            return execute(job, events)
        finally:
            job.release()


def prepare_job(spec: JobSpec, log: Callable[[str], None], folder: ModelFolder | None = None,
                writes_video: bool = True, inputs: tuple[Path, ...] = (), kept: KeptDiT | None = None) -> PreparedJob:
    """Pre-flight: the request (see prepare_request), then the files it writes, planned and claimed by outputs.py
    (an existing file is kept unless overwrite; a checkpoint left by an earlier run needs resume or overwrite;
    nothing may overwrite the profile, a model file or `inputs`). Without writes_video only the checkpoint option
    is a file. Nothing heavy is loaded; call `release()` on the result when the run is over."""
    job = prepare_request(spec, log, folder, kept)
    options, par = job.options, job.par
    if not writes_video:
        job.checkpoint = Path(options["checkpoint"]) if options["checkpoint"] else None
        if job.checkpoint:
            preflight.check_writable(job.checkpoint)
        return job
    earlier = checkpoint_path(spec.output) if spec.output else None
    resume = wants_resume(options, earlier)
    asked = (job.request.fingerprint(job.pipe.folder.root, job.pipe.profile.compute_dtype)
             if resume and options["save_latents"] else None)
    planned = problem = None
    if par is None or par.writer:   # only rank 0 writes; a default name has its time stamp
        try:
            planned = outputs.plan_outputs(spec.output, prompt=spec.prompt, save_latents=options["save_latents"],
                                           inputs=[job.pipe.profile.path, *inputs], model_root=job.pipe.folder.root,
                                           overwrite=options["overwrite"], resume=resume, request=asked,
                                           preview=bool(options["preview"]))
        except StepVideoError as e:
            problem = e
    if par is not None:
        sent = par.broadcast_from_writer((planned and planned.unclaimed(), problem and str(problem)))
        planned, problem = (planned, problem) if par.writer else sent
    if problem:
        raise problem if isinstance(problem, StepVideoError) else UsageError(problem)
    job.output, job.checkpoint, job.outputs = planned.output, planned.checkpoint, planned
    return job


def prepare_request(spec: JobSpec, log: Callable[[str], None], folder: ModelFolder | None = None,
                    kept: KeptDiT | None = None) -> PreparedJob:
    """Folder (unless already opened), profile and device (its explicit kernels probed), sizes and numbers; no output
    paths yet."""
    folder = folder or preflight.model_folder(spec)
    folder.check_weights()
    profile = preflight.profile_for(spec, log=log)
    note_weight_format(folder, profile, log)
    preflight.check_numbers(spec)
    preflight.check_kind_inputs(spec, folder)
    options = preflight.run_options(spec)
    live_preview.check_every(options["preview"])
    turbo = bool(options["turbo"] or folder.turbo)
    defaults = sampling_defaults(turbo, folder.kind)
    preset = preflight.preset_for(spec, profile, defaults["steps"] if turbo else None, log,
                                  defaults.get("max_frames"))
    request = Request(spec.prompt, spec.negative_prompt, preset,
                      defaults["guidance_scale"] if spec.guidance_scale is None else spec.guidance_scale,
                      defaults["shift"] if spec.shift is None else spec.shift, spec.seed)
    if folder.kind == "ti2v":
        request.image_latents = options["image_latents"]
        if spec.image is not None:
            request.image = first_image(spec.image, (preset.height, preset.width))
        request.motion_score = defaults["motion_score"] if spec.motion_score is None else spec.motion_score
    request.prompt_embeds, request.latents = options["prompt_embeds"], options["latents"]
    dit = folder.open("transformer", layers=0).config
    check_given(request, latent_shape(preset.frames, preset.height, preset.width, channels=dit.in_channels).shape,
                dit.caption_channels)
    par = parallel_for(options["parallel"], profile)
    preflight.check_kernels(profile, folder.weight_format, par)
    if par is None:
        runtime = DeviceRuntime(folder, profile, log=log, kept=kept) if kept is not None else None
        pipe = PhasePipeline(folder, profile, log=log, options=preflight.speed_options(spec), runtime=runtime)
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
        if job.outputs.save_latents:
            outputs.save_final_latents(job.outputs, latents,
                                       request.fingerprint(job.pipe.folder.root, job.pipe.profile.compute_dtype))
        events.phase("decode")
        frames = decode_frames(job.pipe, latents)
        events.phase("write")
        output = outputs.write_outputs(job.outputs, frames, job.pipe, outputs.job_metadata(job, request),
                                       time.perf_counter() - start, events.log)
    except KeyboardInterrupt:
        if job.checkpoint and job.checkpoint.is_file():
            raise Interrupted(job.checkpoint, None) from None
        raise
    except BaseException:
        if job.checkpoint and job.checkpoint.is_file():
            flags = "--resume --overwrite" if job.output and job.output.exists() else "--resume"   # mp4 written?
            events.log(f"note: the denoised latents are kept in {job.checkpoint}; run the same command with "
                       f"{flags} to only decode")
        raise
    if job.checkpoint:
        job.checkpoint.unlink(missing_ok=True)
    return JobResult(output, used, dict(job.pipe.timings), time.perf_counter() - start)


def denoise_job(job: PreparedJob, events: Events) -> tuple[torch.Tensor, Preset]:
    """Plan, text phase, denoising (with checkpoints, OOM step-down and stop requests): final latents and the
    preset that made them. `job.pipe` becomes the pipeline that ran them (its profile lowered to what fits)."""
    pipe, options, ckpt, par = job.pipe, job.options, job.checkpoint, job.par
    writer = par is None or par.writer
    resume = ckpt is not None and wants_resume(options, ckpt)
    if resume and par is None and not ckpt.is_file():
        kept = saved_final_latents(job)
        if kept is not None:
            return kept
    if options["text_cache"] and writer:   # the other ranks take rank 0's embeddings
        pipe.cache = pipe.embedding_cache(options["text_cache_dir"])
    events.phase("plan")
    ladder, pipe = plan_ladder(pipe, job.request.preset, ckpt if resume else None, events.log, par)
    keep_warm(pipe, ladder[0], events.log)      # a DiT kept from the last video is dropped here if it must go
    if job.request.given_tensors:
        ladder = same_size(ladder, job.request.preset)
    if resume:
        check_resumable(pipe, job.request, ladder, ckpt)
    events.phase("text")
    embeds = job.request.prompt_embeds
    if embeds is None:
        embeds, pipe = encode_with_fallback(pipe, job.request) if writer else (None, pipe)
    job.text_cached = "text" not in pipe.timings   # the text phase did not run: embeddings from the cache
    if par is not None:
        embeds = par.broadcast_from_writer(embeds)
    events.phase("denoise")
    pipe.preview = live_preview.preview_hook(options["preview"] if writer else 0, job.outputs and job.outputs.preview,
                                             pipe.folder.root / "vae", job.request.preset.steps, events.preview,
                                             events.log, frames_listener=events.preview_frames)
    job.pipe = pipe
    return denoise_with_fallback(pipe, job.request, ladder, ckpt, resume, options["checkpoint_every"], embeds,
                                 events.should_stop, par)


def saved_final_latents(job: PreparedJob) -> tuple[torch.Tensor, Preset] | None:
    """--resume with no checkpoint left (--checkpoint-every 0) but the --save-latents file an interrupted run wrote
    for this request (outputs.py then lets it be written again): its latents and preset, to decode again."""
    path = job.outputs.save_latents if job.outputs else None
    if path is None or job.options["overwrite"] or path not in job.outputs.replaceable:
        return None
    saved = saved_request(path) or {}
    ladder = ladder_from(job.pipe.profile.presets, job.request.preset)
    preset = next((p for p in ladder if str(p) == saved.get("preset")), None)
    latents = load_latents(path, job.pipe.folder.root, job.pipe.latent_channels())
    if preset is None or tuple(latents.shape) != _shape(job.pipe, preset):
        return None
    job.pipe.log(f"resuming: the denoising had finished; decoding the latents saved in {path} again")
    return latents, preset


def same_size(ladder: list[Preset], asked: Preset) -> list[Preset]:
    """The presets of the size asked (given latents fit no other); none left: a one-line error."""
    kept = [p for p in ladder if (p.frames, p.height, p.width) == (asked.frames, asked.height, asked.width)]
    if not kept:
        raise OutOfMemory(f"the memory plan says {asked} does not fit, and the latents given fit only that size; "
                          "give latents of a smaller size or use a larger --profile")
    return kept


def decode_frames(pipe: PhasePipeline, latents: torch.Tensor):
    with torch.no_grad():
        return postprocess(pipe.decode(latents))
