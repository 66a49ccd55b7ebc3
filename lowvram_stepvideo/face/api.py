"""The Python API; generate.py's engine, with the same guards.

    from lowvram_stepvideo import StepVideoPipeline
    pipe = StepVideoPipeline.from_pretrained("./stepvideo-t2v-int8", profile="24gb")
    frames = pipe(prompt="a red fox in the snow", seed=0)            # uint8 (T, H, W, 3)
    pipe.generate("a red fox in the snow", output="fox.mp4")        # mp4 + sidecar, like generate.py
    pipe.generate_many(["a cat", "a dog"], output_dir="results/pets")

    ti2v = StepVideoPipeline.from_pretrained("./stepvideo-ti2v-int8")   # image + prompt to video
    frames = ti2v("the fox turns its head", image="fox.jpg", motion_score=5.0)

Every call runs the path of a job (run/job.py): folder validation, the device check (a CUDA profile without a GPU
is refused before anything is allocated), the memory plan and preset ladder, out-of-memory step-down, resume when
asked. Every error is a `StepVideoError` with the one-line message generate.py prints. Between calls (and the videos
of `generate_many`) the pipeline keeps its DiT in RAM when the memory plan says it fits beside every phase
(run/warm.py), so the next call does not load it (or pack its blocks) again; the log says so.

Like diffusers pipelines, a call takes the outputs of its early phases in their place: `prompt_embeds=` (the text
phase's (y, y_mask, clip) for [prompt, negative prompt], as `encode_prompt` returns them), `latents=` (the initial
noise (1, T, C, h, w)), and for TI2V `image_latents=` (the first image's sampled latent (1, 1, C, h, w)) in place of
`image`. Given latents fit one size only, so the run does not step down to a smaller preset.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from . import batch
from ..defaults import SEED
from ..run import preflight
from ..run.job import Events, JobResult, denoise_job, encode_all_with_fallback, prepare_job, run_job
from ..errors import UsageError
from ..run.oom import one_line_oom
from ..run.preflight import JobSpec
from ..run.warm import KeptDiT
from ..profiles import Preset
from ..files.video import postprocess
from ..pipeline.conditioning import prepare_first_image
from ..pipeline.phases import PhasePipeline

OUTPUT_TYPES = ("uint8", "video", "latent")


class StepVideoPipeline:
    """One model folder and profile; each call is one job (run/job.py)."""

    def __init__(self, model_dir: Path | None = None, profile: str | None = None, demo: bool | str = False,
                 log: Callable[[str], None] | None = None, **options):
        """model_dir: a release or quantize.py folder, T2V or TI2V (or demo=True: the built-in tiny T2V model,
        demo="ti2v": the tiny TI2V one); profile: a name, a .toml path or None (auto: by the card; 'cpu' for the
        demo). options: profile overrides (attention, dit_resident_blocks, vae_tile, ...) and run options
        (checkpoint_every, text_cache, text_cache_dir, turbo, step_cache, compile); see defaults.RUN_OPTIONS."""
        self.base = JobSpec("", model_dir=Path(model_dir) if model_dir else None, demo=demo, profile=profile,
                            options=dict(options))
        self.events = Events(log)
        for note in preflight.old_option_names(options):
            self.events.log(note)
        self.folder = preflight.model_folder(self.base)
        self.profile = preflight.profile_for(self.base)      # the device check and overrides, now
        self.last_preset: Preset | None = None               # what the last call ran, after any step-down
        self.timings: dict[str, float] = {}
        self.kept = KeptDiT()      # the DiT kept between calls when the plan says RAM allows (run/warm.py)

    @property
    def kind(self) -> str:
        """"t2v" (prompt to video) or "ti2v" (first image + prompt to video)."""
        return self.folder.kind

    @classmethod
    def from_pretrained(cls, model_dir, profile: str | None = None, **kwargs) -> "StepVideoPipeline":
        return cls(model_dir, profile, **kwargs)

    def __call__(self, prompt: str | None = None, negative_prompt: str | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, time_shift: float | None = None, seed: int = SEED,
                 output_type: str = "uint8", checkpoint: Path | None = None, resume: bool = False,
                 image=None, motion_score: float | None = None, prompt_embeds=None,
                 latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                 preview: int | None = None, preview_callback: Callable[[int, torch.Tensor], None] | None = None):
        """Frames of one video. Sizes default to the profile's first preset (TI2V: at most 102 frames), steps /
        guidance / shift to the release's (turbo's for a turbo folder). output_type: "uint8" (T, H, W, 3) after
        the reference post-processing, "video" (B, T, 3, H, W) in [-1, 1], "latent" (final latents). checkpoint:
        save the latents there every few steps; resume=True continues from it. TI2V: image (a path, PIL image,
        uint8 array or tensor; see prepare_first_image) or image_latents, motion_score (default 5). prompt_embeds,
        latents, image_latents: see the module docstring. preview=N with preview_callback: every N steps and after
        the last, preview_callback(steps done, frames) gets the live preview, uint8 (F, H, W, 3) on the CPU, one
        frame per latent frame (the latents it is made from are not changed: the result is the same without)."""
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        if resume and checkpoint is None:
            raise UsageError("resume=True needs checkpoint=PATH (the file an earlier call saved its latents to)")
        if image is not None and image_latents is not None:
            raise UsageError("give image= or image_latents= (the image's latent), not both")
        if bool(preview) != (preview_callback is not None):
            raise UsageError("give preview=N (every N steps) and preview_callback= (what gets the frames) together")
        events = self.events
        if preview_callback is not None:
            events = copy.copy(self.events)
            events.preview_frames = preview_callback
        given = {"prompt_embeds": prompt_embeds, "latents": latents, "image_latents": image_latents}
        spec = self._spec(prompt or "", negative_prompt, seed, num_frames, height, width, num_inference_steps,
                          guidance_scale, time_shift, image=image, motion_score=motion_score,
                          options={"checkpoint": checkpoint, "resume": resume, "preview": preview or 0,
                                   **{k: v for k, v in given.items() if v is not None}})
        with one_line_oom():
            job = prepare_job(spec, events.log, folder=self.folder, writes_video=False, kept=self.kept)
            latents, self.last_preset = denoise_job(job, events)
            if output_type != "latent":
                with torch.no_grad():
                    video = job.pipe.decode(latents)
            self.timings = job.pipe.timings
        if checkpoint is not None:
            Path(checkpoint).unlink(missing_ok=True)   # the call finished: nothing left to resume
        if output_type == "latent":
            return latents
        return video if output_type == "video" else _postprocess(video)

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> tuple:
        """The text phase alone: (y, y_mask, clip) on the CPU for [prompt, negative prompt], what prompt_embeds=
        takes (the reference's magic suffix and default negative prompt for this model's kind are applied)."""
        pipe = self._phases()
        with one_line_oom():
            embeds = encode_all_with_fallback(pipe, [(prompt, negative_prompt)])[0][0]
        return tuple(t.cpu() for t in embeds)

    def encode_image(self, image, height: int, width: int, seed: int = SEED) -> torch.Tensor:
        """TI2V's image phase alone: the first image's sampled latent (1, 1, C, height/16, width/16) on the CPU,
        what image_latents= takes (the sample's noise is drawn for `seed`, as a call with image= and that seed)."""
        if self.kind != "ti2v":
            raise UsageError(f"{self.folder.root} is a Step-Video-T2V folder: it takes no first image")
        first = prepare_first_image(image, height, width)
        with one_line_oom(), torch.no_grad():
            return self._phases().encode_image(first, seed)

    def _phases(self) -> PhasePipeline:
        return PhasePipeline(self.folder, self.profile, log=self.events.log)

    def generate(self, prompt: str, output: Path | None = None, **kwargs) -> JobResult:
        """One video written as generate.py writes it (mp4 + sidecar; default results/<prompt>-<time>.mp4).
        kwargs: JobSpec fields (seed, frames, height, width, steps, guidance_scale, shift, negative_prompt; TI2V:
        image, motion_score) and options={...}."""
        spec = self._spec(prompt, output=output, **kwargs)
        with one_line_oom():
            return run_job(spec, self.events, kept=self.kept)

    def generate_many(self, prompts: list[str] | Path, output_dir: Path, seeds: list[int] | None = None,
                      **kwargs) -> batch.BatchReport:
        """A batch (like generate.py --prompts-file): prompts (a list, or a prompts file) encoded in one text
        phase, each video denoised and decoded in turn; finished videos are skipped, an interrupted one resumes.
        kwargs as for generate (applied to every prompt)."""
        seed = kwargs.pop("seed", SEED)
        items = (batch.read_prompts_file(Path(prompts), seeds, seed) if isinstance(prompts, (str, Path))
                 else batch.items_from_prompts(prompts, seeds, seed))
        return batch.run_batch(items, self._spec("", **kwargs), Path(output_dir), self.events.log, folder=self.folder,
                               kept=self.kept)

    def _spec(self, prompt: str, negative_prompt: str | None = None, seed: int = SEED, frames: int | None = None,
              height: int | None = None, width: int | None = None, steps: int | None = None,
              guidance_scale: float | None = None, shift: float | None = None, output: Path | None = None,
              options: dict | None = None, image=None, motion_score: float | None = None) -> JobSpec:
        for note in preflight.old_option_names(options or {}):
            self.events.log(note)
        return JobSpec(prompt, negative_prompt, seed, frames, height, width, steps, guidance_scale, shift,
                       self.base.model_dir, self.base.demo, self.base.profile, output,
                       {**self.base.options, **(options or {})}, image, motion_score)


def _postprocess(video: torch.Tensor):
    return postprocess(video)
