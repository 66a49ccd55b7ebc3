"""`generate.py --web`: the local web page (Gradio, the optional `web` extra).

Left: the prompt with "Generate" and "Check fit" beside it (in view without scrolling), then the other settings of a
video (for an image-to-video model also the first image and the motion score), and the card and RAM sizes that "Check fit" can plan for instead of this machine's. Right: the queue (jobs
run one at a time, each with its phase, progress, elapsed time and ETA; cancel and resume), then the finished
videos of the results folder, playable beside their first image, with their sidecar settings and "Reuse these settings". The page polls the
queue once a second (a message about a job is replaced by what became of it). What each control does is in
web_page.py; this file only lays out and wires the components.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import web_view
from ..run.outputs import RESULTS
from ..defaults import DEMO_PRESET, RELEASE_SAMPLING, RUN_OPTIONS, SEED, TURBO_SAMPLING, WEB_PORT
from ..errors import StepVideoError
from ..defaults import TI2V_SAMPLING
from .web_page import ATTENTION, EXPECTED, Form, WebPage
from .job_queue import JobQueue
from .web_catalog import load_catalog

LOCAL, EVERYWHERE = "127.0.0.1", "0.0.0.0"
REFRESH_S = 1.0
FPS = 25   # of the videos written (video.write_mp4)
# Form fields that "Reuse these settings" fills in (the preset list is rebuilt for the model and profile).
REUSED = ("model", "prompt", "negative_prompt", "seed", "profile", "steps", "guidance_scale", "shift", "attention",
          "text_cache", "resident_blocks", "vae_tile", "matmul", "step_cache", "compile", "image", "motion_score")
MOTION_SLIDER_MAX = 20.0    # the slider's range (the reference suggests 2 to 10-20); the runner takes up to 100
TEXT_FIELDS = ("steps", "guidance_scale", "shift", "resident_blocks", "vae_tile", "step_cache")
CSS = """
.lvs-queue-wrap { width: 100%; overflow-x: auto; }
.lvs-queue { width: 100%; border-collapse: collapse; font-size: 0.9em; }
.lvs-queue th, .lvs-queue td { padding: 4px 6px; border-bottom: 1px solid var(--border-color-primary);
                               text-align: left; }
.lvs-queue th, .lvs-queue td:first-child, .lvs-queue td:nth-child(n+5) { white-space: nowrap; }
.lvs-queue td:nth-child(2) { overflow-wrap: anywhere; }
.lvs-queue progress { width: 5em; vertical-align: middle; }
.lvs-detail { color: var(--body-text-color-subdued); font-size: 0.85em; }
.lvs-preview img { display: block; margin-top: 4px; max-width: 256px; max-height: 160px; image-rendering: auto; }
.lvs-failed td:nth-child(3) { color: var(--error-text-color, #c00); }
#lvs-fit textarea { font-family: monospace; }
"""


class WebError(StepVideoError):
    pass


def import_gradio():
    """Gradio, with its usage statistics off (nothing leaves this machine); a one-line error when missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise WebError('the web page needs Gradio: pip install -e ".[web]" (from the repository root)') from None
    return gradio


def build_app(page: WebPage):
    gr = import_gradio()
    with gr.Blocks(title="lowvram-stepvideo") as app:
        gr.Markdown("## Step-Video on this machine: text (or a first image and text) to video")
        with gr.Row():
            with gr.Column(scale=5):
                form, buttons = _settings(gr, page)
            with gr.Column(scale=6):
                queue = _queue(gr, page)
                gallery = _gallery(gr)
        _wire(gr, page, form, buttons, queue, gallery)
    return app


def _settings(gr, page: WebPage):
    first = page.catalog[0].key
    f = {"model": gr.Dropdown([(c.label, c.key) for c in page.catalog], value=first, label="Model folder",
                              elem_id="lvs-model")}
    with gr.Row(equal_height=True):
        f["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="lvs-prompt", scale=4,
                                 placeholder="An astronaut discovers a monolith on the moon")
        with gr.Column(scale=1, min_width=130, elem_id="lvs-actions"):
            go = gr.Button("Generate", variant="primary", elem_id="lvs-generate")
            fit = gr.Button("Check fit", elem_id="lvs-check-fit")
    message = gr.Markdown(elem_id="lvs-message")
    fit_out = gr.Textbox(label="Memory plan", lines=8, max_lines=30, interactive=False, elem_id="lvs-fit",
                         visible=False)
    f["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="lvs-negative",
                                      placeholder="blank: the release's negative prompt")
    ti2v = page.catalog[0].kind == "ti2v"
    f["image"] = gr.Image(type="filepath", label="First image (image to video: PNG, JPEG or WebP)", height=220,
                          sources=["upload", "clipboard"], elem_id="lvs-image", visible=ti2v)
    f["motion_score"] = gr.Slider(0, MOTION_SLIDER_MAX, value=TI2V_SAMPLING["motion_score"], step=0.5,
                                  label="Motion score: 2 steady, 5 default, 10-20 lively", elem_id="lvs-motion",
                                  visible=ti2v)
    with gr.Row():
        f["seed"] = gr.Number(SEED, label="Seed", precision=0, elem_id="lvs-seed", scale=3)
        dice = gr.Button("Random seed", elem_id="lvs-random-seed", scale=1)
    f["profile"] = gr.Dropdown(page.profiles, value=page.default_profile, label="Profile", elem_id="lvs-profile")
    note = gr.Markdown(page.profile_note(page.default_profile, first), elem_id="lvs-profile-note")
    sizes = preset_choices(page, first, page.default_profile)
    f["preset"] = gr.Dropdown(sizes, value=sizes[0][1] if sizes else None, elem_id="lvs-preset",
                              label="Size: frames x height x width (on out-of-memory the run steps down this list)")
    _numbers(gr, f, page)
    with gr.Accordion("Check fit for another machine", open=False):
        with gr.Row():
            f["vram_gib"] = gr.Textbox(label="Graphics card memory, GiB", elem_id="lvs-vram",
                                       placeholder="blank: this machine's card")
            f["ram_gib"] = gr.Textbox(label="Memory (RAM), GiB", elem_id="lvs-ram",
                                      placeholder="blank: this machine's")
    return f, {"dice": dice, "note": note, "fit": fit, "go": go, "message": message, "fit_out": fit_out}


def _numbers(gr, f: dict, page: WebPage) -> None:
    """Sampling numbers and speed options: text fields, blank = the default."""
    release, turbo = RELEASE_SAMPLING, TURBO_SAMPLING
    with gr.Row():
        f["steps"] = gr.Textbox(label="Steps", elem_id="lvs-steps",
                                placeholder=f"the profile's (demo {DEMO_PRESET.steps}, turbo {turbo['steps']})")
        guidance = f"{release['guidance_scale']:g} (turbo {turbo['guidance_scale']:g})"
        f["guidance_scale"] = gr.Textbox(label="Guidance scale", elem_id="lvs-guidance", placeholder=guidance)
        f["shift"] = gr.Textbox(label="Shift", elem_id="lvs-shift",
                                placeholder=f"{release['shift']:g} (turbo {turbo['shift']:g})")
    with gr.Accordion("Speed and caches", open=False):
        f["attention"] = gr.Dropdown(list(ATTENTION), value="profile", label="Attention",
                                     info="profile: the profile's choice; flash and sage need their packages")
        f["matmul"] = gr.Dropdown(page.matmul_choices(page.default_profile), value="profile", label="Matmul",
                                  elem_id="lvs-matmul", info="int8/fp8 folders: weight-only is exact; fast uses "
                                  "int8/fp8 tensor cores where the card has them (slightly different video)")
        f["step_cache"] = gr.Textbox(label="Step cache threshold", elem_id="lvs-step-cache",
                                     placeholder="blank = off; e.g. 0.1: faster, slightly different video")
        f["compile"] = gr.Checkbox(RUN_OPTIONS["compile"], elem_id="lvs-compile",
                                   label="torch.compile the DiT blocks (the first step compiles)")
        f["text_cache"] = gr.Checkbox(RUN_OPTIONS["text_cache"], label="Text cache: reuse the text embeddings of "
                                      "the same prompt", elem_id="lvs-text-cache")
        f["resident_blocks"] = gr.Textbox(label="DiT blocks kept on the GPU", elem_id="lvs-resident",
                                          placeholder="the profile's, lowered by the memory plan to what fits")
        f["vae_tile"] = gr.Textbox(label="VAE tile (latent pixels, 0 = untiled)", placeholder="the profile's",
                                   elem_id="lvs-vae-tile")


def _queue(gr, page: WebPage):
    gr.Markdown("### Queue")
    table = gr.HTML(page.queue_view()[0], elem_id="lvs-queue")
    with gr.Row():
        job = gr.Dropdown([], label="Job", elem_id="lvs-job", scale=3)
        cancel = gr.Button("Cancel", elem_id="lvs-cancel", scale=1)
        resume = gr.Button("Resume", elem_id="lvs-resume", scale=1)
    return {"table": table, "job": job, "cancel": cancel, "resume": resume, "timer": gr.Timer(REFRESH_S)}


def _gallery(gr):
    gr.Markdown("### Finished videos")
    pick = gr.Dropdown([], label="Video", elem_id="lvs-video-pick")
    with gr.Row():
        player = gr.Video(label="Video", interactive=False, elem_id="lvs-player", loop=True, scale=3)
        first = gr.Image(label="First image", interactive=False, elem_id="lvs-first-image", visible=False, scale=2)
    speed = gr.Markdown(elem_id="lvs-speed")
    settings = gr.JSON(label="Settings (sidecar)", elem_id="lvs-settings")
    reuse = gr.Button("Reuse these settings", elem_id="lvs-reuse")
    return {"pick": pick, "player": player, "first": first, "speed": speed, "settings": settings, "reuse": reuse,
            "seen": gr.State({})}


def _wire(gr, page: WebPage, f: dict, b: dict, q: dict, g: dict) -> None:
    fields = list(f.values())
    names = list(f)

    def form(*values) -> Form:
        return Form(**dict(zip(names, values)))

    def presets(model, profile, current=None):
        choices = preset_choices(page, model, profile)
        values = [v for _, v in choices]
        return gr.update(choices=choices, value=current if current in values else values[0] if values else None)

    def show(name):
        """The video, its first image (image to video), its speed line and its sidecar."""
        video, meta = page.show(name)
        image = page.first_image(meta)
        return video, gr.update(value=image, visible=image is not None), web_view.speed_line(meta or {}), meta

    def kind_fields(model):
        """The first image and the motion score are shown for an image-to-video model only."""
        shown = page.choice(model).kind == "ti2v"
        return gr.update(visible=shown), gr.update(visible=shown)

    def tick(seen: dict, job: str | None, message: str | None):
        table, jobs = page.queue_view()
        status = page.status_line(message)
        videos = page.video_choices()
        ids = [v for _, v in jobs]
        job_update = gr.skip()
        if jobs != seen.get("jobs") or (job not in ids and ids):
            job_update = gr.update(choices=jobs, value=job if job in ids else ids[0] if ids else None)
        if videos == seen.get("videos"):
            video_updates = [gr.skip()] * 5
        else:   # something finished: list it and show the newest
            newest = videos[0][1] if videos else None
            video_updates = [gr.update(choices=videos, value=newest), *show(newest)]
        return (table, job_update, *video_updates, {"jobs": jobs, "videos": videos},
                gr.skip() if status is None else status)

    def reuse(name, current_model):
        try:
            values = page.reuse(name)
        except ValueError as e:
            return [gr.skip()] * (len(REUSED) + 2) + [f"**error:** {e}"]
        missing = "" if values["model"] else " (its model folder is not in this page's list: kept the current one)"
        values["model"] = values["model"] or current_model
        texts = {k: "" if values[k] is None else str(values[k]) for k in TEXT_FIELDS}
        texts["matmul"] = gr.update(choices=page.matmul_choices(values["profile"]), value=values["matmul"])
        shown = page.choice(values["model"]).kind == "ti2v"
        texts["image"] = gr.update(value=values["image"], visible=shown)
        motion = values["motion_score"]
        texts["motion_score"] = gr.update(value=TI2V_SAMPLING["motion_score"] if motion is None else motion,
                                          visible=shown)
        return (*[texts.get(k, values[k]) for k in REUSED], presets(values["model"], values["profile"],
                values["preset"]), page.profile_note(values["profile"], values["model"]),
                f"settings of {name} loaded{missing}")

    gr.on([f["model"].input, f["profile"].input], lambda m, p, cur: presets(m, p, cur),
          [f["model"], f["profile"], f["preset"]], f["preset"])
    gr.on([f["model"].input, f["profile"].input], lambda p, m: page.profile_note(p, m), [f["profile"], f["model"]],
          b["note"])
    f["model"].input(kind_fields, f["model"], [f["image"], f["motion_score"]])
    f["profile"].input(lambda p, m: gr.update(choices=page.matmul_choices(p), value=m), [f["profile"], f["matmul"]],
                       f["matmul"])
    b["dice"].click(page.random_seed, None, f["seed"])
    b["go"].click(lambda *v: page.submit(form(*v)), fields, b["message"])
    b["fit"].click(lambda *v: gr.update(value=page.check_fit(form(*v)), visible=True), fields, b["fit_out"])
    q["cancel"].click(page.cancel, q["job"], b["message"])
    q["resume"].click(page.resume, q["job"], b["message"])
    q["timer"].tick(tick, [g["seen"], q["job"], b["message"]],
                    [q["table"], q["job"], g["pick"], g["player"], g["first"], g["speed"], g["settings"], g["seen"],
                     b["message"]])
    g["pick"].input(show, g["pick"], [g["player"], g["first"], g["speed"], g["settings"]])
    g["reuse"].click(reuse, [g["pick"], f["model"]], [*(f[k] for k in REUSED), f["preset"], b["note"], b["message"]])


def preset_choices(page: WebPage, model: str, profile: str) -> list[tuple[str, str]]:
    try:
        return [(f"{p} ({p.frames / FPS:.1f} s of video)", str(p)) for p in page.presets(model, profile)]
    except EXPECTED:   # an unreadable profile: the profile note says why
        return []


def serve(model_dir: Path | None, demo: bool, profile: str | None, port: int | None, listen: bool) -> int:
    """Serve the page until Ctrl-C; the running job is then stopped with its checkpoint saved."""
    catalog = load_catalog(model_dir, demo, warn=_say)
    import_gradio()
    RESULTS.mkdir(parents=True, exist_ok=True)
    queue = JobQueue(results_dir=RESULTS, keep_jobs=True)   # a restarted page lists unfinished jobs again
    page = WebPage(catalog, queue, RESULTS, profile or "auto")
    app = build_app(page)
    host, port = (EVERYWHERE if listen else LOCAL), port or WEB_PORT
    try:
        app.launch(server_name=host, server_port=port, quiet=True, prevent_thread_lock=True, ssr_mode=False,
                   allowed_paths=[str(RESULTS.resolve())], css=CSS, footer_links=["settings"])
    except OSError as e:
        queue.close()
        cause = str(e).split(". ")[0].rstrip(".")   # Gradio adds advice about its own settings
        raise WebError(f"cannot serve on {host}:{port} ({cause}); is another page running? choose another "
                       "--port") from None
    _announce(host, port, listen)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("stopping: a running job saves its resume checkpoint; the page lists the unfinished jobs again when it "
             "is started in this folder (Resume continues them)")
    finally:
        queue.close()
        app.close()
    return 0


def _announce(host: str, port: int, listen: bool) -> None:
    if listen:
        _say("!" * 100)
        _say(f"!! --listen: the page is served on EVERY network interface of this machine ({host}:{port}).")
        _say("!! Anyone who can reach this port can queue jobs on this GPU and see every result. No password.")
        _say(f"!! From another machine: http://<this machine's address>:{port}/")
        _say("!" * 100)
    _say(f"web page: http://127.0.0.1:{port}/  (results in {RESULTS.resolve()}; Ctrl-C stops)")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
