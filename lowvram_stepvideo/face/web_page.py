"""What the web page does, without Gradio: each method is one button or field of the page, takes the form's values
and returns what the page shows. `web.py` wires these to Gradio components; tests call them directly.

The browser names a model folder by its key in the catalog (web_catalog.py) and never sends a path. A first image
(image to video) uploaded through the page is kept in the results folder's FIRST_IMAGES folder, named by its
SHA-256, so a job, its resume and "Reuse these settings" find it; the page shows only images kept there."""
from __future__ import annotations

import dataclasses
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..defaults import DEMO_PRESET, RUN_OPTIONS, SEED, WEB_PREVIEW_EVERY, SpeedOptions
from ..run import preflight
from ..run.request import first_image
from . import web_view
from ..errors import StepVideoError
from ..planning.fit import check_fit
from .job_queue import JobQueue, JobSpec
from ..profiles import Preset, Profile, detect_vram_bytes, list_profiles, load_profile, with_overrides
from ..engines.host_store import available_ram_bytes
from ..planning.budgets import auto_choice
from ..defaults import TI2V_SAMPLING
from ..files.images import file_sha256
from ..pipeline.sampling import motion_score_problem
from .web_catalog import ModelChoice
from .web_view import in_page_words

GiB = 2**30

AUTO = "auto"
ATTENTION = ("profile", "auto", "sdpa", "flash", "sage")   # "profile": keep the profile's choice
MATMUL = ("profile", "weight-only", "fast")
# What a handler may fail with: a one-line message for the page, never a traceback.
EXPECTED = (StepVideoError, ValueError, OSError)
FIRST_IMAGES = "first-images"   # the page's copies of uploaded first images, inside the results folder
FILE_ROUTE = "/gradio_api/file="   # where Gradio serves a file of its allowed paths (the results folder)


@dataclass
class Form:
    """The settings of one video, as the page's fields hold them (None = blank = the default)."""
    model: str
    prompt: str
    negative_prompt: str | None = None
    seed: float | str | None = SEED
    profile: str = AUTO
    preset: str | None = None
    steps: str | None = None            # the number fields are text: blank means "the default"
    guidance_scale: str | None = None
    shift: str | None = None
    attention: str = "profile"
    text_cache: bool = RUN_OPTIONS["text_cache"]    # read and write the text-embedding cache
    resident_blocks: str | None = None
    vae_tile: str | None = None
    matmul: str = "profile"
    step_cache: str | None = None       # first-block step cache threshold; blank (or 0) = off
    compile: bool = RUN_OPTIONS["compile"]
    vram_gib: str | None = None         # Check fit for another machine: its card and RAM (blank: this one)
    ram_gib: str | None = None
    image: str | None = None            # image to video: the uploaded first image (a file Gradio saved)
    motion_score: float | str | None = None


class WebPage:
    def __init__(self, catalog: list[ModelChoice], queue: JobQueue, results_dir: Path, profile: str = AUTO):
        self.catalog, self.queue, self.results_dir = catalog, queue, Path(results_dir)
        self.profiles = [AUTO] + list_profiles()
        if profile not in self.profiles:   # a .toml path given with --profile: offered too (ConfigError if bad)
            load_profile(profile)
            self.profiles.append(profile)
        self.default_profile = profile
        self._captions: dict[Path, tuple[float, str]] = {}   # video -> (mtime, caption): sidecars read once

    # ---- settings ------------------------------------------------------------------------------------------------

    def choice(self, key: str) -> ModelChoice:
        for c in self.catalog:
            if c.key == key:
                return c
        raise ValueError(f"unknown model choice {key!r}; reload the page")

    def resolve_profile(self, name: str, model: str | None = None) -> Profile:
        """The profile a job of `model` runs with: the name's, or for auto the one generate.py picks (the demo:
        cpu; else by this machine's card and RAM)."""
        if name not in self.profiles:
            raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(self.profiles)}")
        demo_model = model is not None and self.choice(model).demo
        return preflight.profile_for(JobSpec("", demo=demo_model, profile=name), need_device=False)

    def profile_note(self, name: str, model: str | None = None) -> str:
        """What a profile means here; for auto, which profile it picks on this machine and why, in plain words."""
        try:
            profile = self.resolve_profile(name, model)
        except EXPECTED as e:
            return f"**error:** {in_page_words(str(e))}"
        if name != AUTO:
            return profile.description
        if model is not None and self.choice(model).demo:
            why = "the demo's tiny model always runs on the CPU, with the cpu profile"
        elif detect_vram_bytes() is None:
            why = (f"no NVIDIA graphics card was found, so the video is made on the CPU, with the profile for this "
                   f"machine's {available_ram_bytes() / GiB:.0f} GiB of free memory (slow)")
        else:
            vram = detect_vram_bytes() / GiB
            why = f"the profile made for a {vram:.0f} GiB graphics card like this one"
            if profile.memory.host_ram_gb < load_profile(profile.name).memory.host_ram_gb:
                why += ", with less of the model held in this machine's memory (the rest is read from disk)"
        return f"auto: {profile.name}: {why}. {profile.description}"

    def matmul_choices(self, profile: str) -> list[tuple[str, str]]:
        """(label, value) of the matmul list: the first keeps the profile's choice and names it."""
        try:
            mine = f"profile ({self.resolve_profile(profile, None).matmul})"
        except EXPECTED:   # an unreadable profile: the profile note says why
            mine = "profile"
        return [(mine, "profile")] + [(m, m) for m in MATMUL[1:]]

    def presets(self, model: str, profile: str) -> list[Preset]:
        """The ladder offered for this model and profile, largest first; the demo's tiny size leads for the demo.
        An image-to-video model's ladder is capped at its 102 frames (as a run caps it)."""
        choice, ladder = self.choice(model), list(self.resolve_profile(profile, model).presets)
        if choice.kind == "ti2v":
            cap = TI2V_SAMPLING["max_frames"]
            ladder = list(dict.fromkeys(dataclasses.replace(p, frames=min(p.frames, cap)) for p in ladder))
        return [DEMO_PRESET] + ladder if choice.demo else ladder

    def random_seed(self) -> int:
        return random.randrange(2**31)

    # ---- jobs ----------------------------------------------------------------------------------------------------

    def spec(self, form: Form, need_image: bool = True) -> JobSpec:
        """The job of a filled-in form; ValueError (one line) for what the page can tell is wrong. An
        image-to-video model needs the first image (unless `need_image` is False: the memory plan does not)."""
        choice = self.choice(form.model)
        image, motion = self._first_image(choice, form, need_image)
        if not (form.prompt or "").strip():
            raise ValueError("the prompt is empty: describe the video to generate")
        self.resolve_profile(form.profile, form.model)
        if not form.preset:
            raise ValueError("choose a size from the preset list")
        size = Preset.parse(form.preset, steps=1)
        options = {"text_cache": bool(form.text_cache), "preview": WEB_PREVIEW_EVERY}   # the page's live preview
        for key, value, choices in (("attention", form.attention, ATTENTION), ("matmul", form.matmul, MATMUL)):
            if value not in choices:
                raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
            if value != "profile":
                options[key] = value
        step_cache = _number(form.step_cache, "step cache threshold", float)
        if step_cache:
            SpeedOptions(cache=step_cache)   # ValueError (one line) outside [0, 1)
            options["step_cache"] = step_cache
        if form.compile:
            options["compile"] = True
        for key, value, what in (("dit_resident_blocks", form.resident_blocks, "resident blocks"),
                                 ("vae_tile", form.vae_tile, "VAE tile")):
            if _number(value, what, int) is not None:
                options[key] = _number(value, what, int)
        return JobSpec(prompt=form.prompt.strip(), negative_prompt=(form.negative_prompt or "").strip() or None,
                       seed=_number(form.seed, "seed", int) or SEED, frames=size.frames, height=size.height,
                       width=size.width, steps=_number(form.steps, "steps", int),
                       guidance_scale=_number(form.guidance_scale, "guidance scale", float),
                       shift=_number(form.shift, "shift", float), model_dir=choice.path, demo=choice.demo,
                       profile=form.profile, options=options, image=image, motion_score=motion)

    def _first_image(self, choice: ModelChoice, form: Form, need_image: bool) -> tuple[Path | None, float | None]:
        """(the kept first image, the motion score) of an image-to-video model; (None, None) for text to video."""
        if choice.kind != "ti2v":
            return None, None
        motion = _number(form.motion_score, "motion score", float)
        problem = motion_score_problem(motion)
        if problem:
            raise ValueError(problem.replace("--motion-score", "motion score"))
        if not form.image:
            if need_image:
                raise ValueError("this model makes a video from a first image: upload one (PNG, JPEG or WebP)")
            return None, motion
        return self.keep_image(Path(form.image)), motion

    def keep_image(self, upload: Path) -> Path:
        """The page's own copy of an uploaded first image (an upload's temporary file may go away before the job
        runs or is resumed); one copy per content."""
        if not upload.is_file():
            raise ValueError("the uploaded image is gone; upload it again")
        folder = self.results_dir / FIRST_IMAGES
        if upload.parent.resolve() == folder.resolve():
            return upload
        kept = folder / f"{file_sha256(upload)[:24]}{upload.suffix.lower()}"
        if not kept.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(upload, kept)
        return kept

    def first_image(self, meta: dict | None) -> str | None:
        """A finished video's first image when the page kept it (the page serves nothing outside its folder)."""
        image = Path(str((meta or {}).get("image") or ""))
        folder = (self.results_dir / FIRST_IMAGES).resolve()
        return str(image) if image.is_file() and image.resolve().parent == folder else None

    def submit(self, form: Form) -> str:
        """Queue the form's job; what pre-flight can refuse cheaply (numbers, a GPU profile without a GPU) is
        refused here rather than as a failed job."""
        try:
            spec = self.spec(form)
            preflight.check_numbers(spec)
            preflight.profile_for(spec)
            if spec.image is not None:
                first_image(spec.image, (spec.height, spec.width))   # decodes, large enough
            job_id = self.queue.submit(spec)
        except EXPECTED as e:
            return f"**error:** {in_page_words(str(e))}"
        return f"queued {job_id}"

    def cancel(self, job_id: str | None) -> str:
        if not job_id:
            return "**error:** choose a job first"
        state = self._state(job_id)
        if state not in ("queued", "running"):
            return f"**error:** {job_id} is {state or 'unknown'}; only a queued or running job can be cancelled"
        self.queue.cancel(job_id)
        return f"cancelling {job_id}: a running job stops after its current step, its checkpoint saved"

    def resume(self, job_id: str | None) -> str:
        if not job_id:
            return "**error:** choose a cancelled or failed job first"
        try:
            new_id = self.queue.resume(job_id)
        except EXPECTED as e:
            return f"**error:** {in_page_words(str(e))}"
        return f"resuming {job_id} as {new_id} (from its checkpoint when it has one)"

    def _state(self, job_id: str) -> str | None:
        return next((s.state for s in self.queue.jobs() if s.id == job_id), None)

    def check_fit(self, form: Form) -> str:
        """The memory plan's verdict for the form's model, profile, size and speed options, resolved as a job would
        resolve them (the prompt plays no part), on this machine or on one with the form's VRAM and RAM sizes."""
        try:
            vram, ram = _gib(form.vram_gib, "VRAM"), _gib(form.ram_gib, "RAM")
            spec = self.spec(dataclasses.replace(form, prompt=form.prompt or "check fit"), need_image=False)
            if preflight.profile_name(spec) == AUTO and (vram or ram):   # picked for that machine
                profile, _ = auto_choice(vram if vram is not None else detect_vram_bytes(), ram)
                profile = with_overrides(profile, **{k: v for k, v in spec.options.items()
                                                     if k not in preflight.RUN_OPTIONS})
            else:
                profile = preflight.profile_for(spec, need_device=False)
            preset = preflight.preset_for(spec, profile, None, lambda msg: None)
            note = ("VRAM does not apply to the CPU profiles (they compute in RAM)\n"
                    if vram is not None and profile.device == "cpu" else "")
            return note + in_page_words(check_fit(preflight.model_folder(spec), profile, preset, vram, ram).report())
        except EXPECTED as e:
            return f"error: {in_page_words(str(e))}"

    def status_line(self, message: str | None) -> str | None:
        """The message line once the job it names ('queued job-1', 'cancelling job-1: ...', 'resuming job-1 as
        job-2') has ended, saying how; None while it still holds."""
        m = re.fullmatch(r"(?:queued|cancelling|resuming \S+ as) (job-\d+)\b.*", message or "")
        status = next((s for s in self.queue.jobs() if s.id == m[1]), None) if m else None
        if status is None or status.state in ("queued", "running"):
            return None
        if status.state == "done":
            return f"{status.id} is done: {Path(status.output).name}" if status.output else f"{status.id} is done"
        return f"{status.id} {status.state}: {in_page_words(status.error or '')}"

    # ---- what the page polls -------------------------------------------------------------------------------------

    def queue_view(self) -> tuple[str, list[tuple[str, str]]]:
        statuses = self.queue.jobs()
        return web_view.queue_html(statuses, self.preview_src), web_view.job_choices(statuses)

    def preview_src(self, status) -> str | None:
        """The URL of a job's latest live preview, when it is a file in the page's results folder (the page serves
        nothing outside it); `?step=` changes with every new preview, so the browser fetches it again."""
        record = status.preview or {}
        path = Path(str(record.get("path") or ""))
        if not path.is_file() or self.results_dir.resolve() not in path.resolve().parents:
            return None
        return f"{FILE_ROUTE}{quote(str(path.resolve()))}?step={int(record.get('step') or 0)}"

    def videos(self) -> list[Path]:
        return web_view.finished_videos(self.results_dir)

    def video_key(self, path: Path) -> str:
        """How the page names a finished video: its path inside the results folder."""
        return path.relative_to(self.results_dir).as_posix()

    def video(self, name: str) -> Path:
        """A finished video by its key: only files of the results folder are ever served."""
        for path in self.videos():
            if self.video_key(path) == name:
                return path
        raise ValueError(f"{name!r} is not a finished video of {self.results_dir}")

    def video_choices(self) -> list[tuple[str, str]]:
        """(caption, key) of the finished videos, newest first."""
        choices = []
        for path in self.videos():
            mtime = path.stat().st_mtime
            if self._captions.get(path, (None,))[0] != mtime:
                self._captions[path] = (mtime, web_view.caption(path, web_view.read_sidecar(path)))
            choices.append((self._captions[path][1], self.video_key(path)))
        return choices

    def show(self, name: str | None) -> tuple[str | None, dict | None]:
        """The video file to play and its sidecar settings."""
        try:
            path = self.video(name or "")
        except ValueError:
            return None, None
        return str(path), web_view.read_sidecar(path)

    def reuse(self, name: str | None) -> dict:
        """The form values of a finished video (see web_view.form_from_sidecar); a profile this page does not
        offer becomes auto."""
        if not name:
            raise ValueError("choose a finished video first")
        meta = web_view.read_sidecar(self.video(name))
        values = web_view.form_from_sidecar(meta, self.catalog)
        if values["profile"] not in self.profiles:
            values["profile"] = AUTO
        values["image"] = self.first_image(meta)
        return values


def _gib(value, what: str) -> int | None:
    """A memory size field in GiB as bytes; None when blank."""
    number = _number(value, f"{what} (GiB)", float)
    if number is None:
        return None
    if not 0 < number < 2**20:
        raise ValueError(f"{what} (GiB) {number:g}: give the memory in GiB, e.g. 12 or 31.5")
    return int(number * GiB)


def _number(value, what: str, kind: type) -> int | float | None:
    """A number field's value; None when blank. ValueError (one line) for text that is not a number of `kind`."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{what} {text!r}: not a number") from None
    if kind is int and number != int(number):
        raise ValueError(f"{what} {text}: must be a whole number")
    return kind(number)
