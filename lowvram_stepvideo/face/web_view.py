"""What the web page shows and sends, as plain functions (no Gradio here): the queue table, the job list, the
finished videos with their sidecars, and the conversions between the form and a JobSpec."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Callable

from ..defaults import RUN_OPTIONS, SEED
from ..files.video import sidecar_path
from .web_catalog import ModelChoice

ACTIVE = ("queued", "running")
FORM_FIELDS = ("model", "prompt", "negative_prompt", "seed", "profile", "preset", "steps", "guidance_scale",
               "shift")


# The command line's words in the page's own (the errors come from code shared with generate.py): the flag, and what
# the page calls the control that sets it. The first that matches wins, so longer phrases come first.
PAGE_WORDS = [
    (r"use --profile cpu \(slow\) or --dry-run to see its memory plan",
     "choose the cpu profile (slow), or press Check fit to see its memory plan"),
    (r"--profile ([\w.-]+)", r"the \1 profile"),
    (r"--card NAME or --capability X\.Y plans another", "the command line's dry run plans another card by name"),
    (r"a card of --list-cards", "a card of the command line's card list"), (r" \(assumed: --assume-format\)", ""),
    (r"--vram-gib N for another", "fill in VRAM under Check fit for another card"),
    (r"--dry-run", "Check fit"), (r"--vram-gib", "VRAM (GiB)"), (r"--ram-gib", "RAM (GiB)"),
    (r"--steps", "Steps"), (r"--cfg", "Guidance scale"), (r"--shift", "Shift"), (r"--seed", "Seed"),
    (r"--negative-prompt", "the negative prompt"), (r"--prompt", "the prompt"), (r"--model-dir", "the model folder"),
    (r"--resident-blocks", "DiT blocks kept on the GPU"), (r"--vae-tile", "VAE tile"), (r"--attention", "Attention"),
    (r"--matmul", "Matmul"), (r"--step-cache", "Step cache threshold"), (r"--cache", "Step cache threshold"),
    (r"--no-text-cache", "the cached text embeddings box"), (r"--no-cache", "the cached text embeddings box"),
    (r"--compile", "torch.compile"), (r"--resume", "Resume"), (r"--profile", "the profile"),
    (r"--frames|--height|--width", "the size"),
]


def in_page_words(text: str) -> str:
    """A message of the shared code with its command-line flags named as the page's controls."""
    for pattern, words in PAGE_WORDS:
        text = re.sub(rf"{pattern}(?![\w-])", words, text)
    return text


def duration(seconds: float | None) -> str:
    """'0:07', '12:30', '1:02:03'; an em dash when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "\u2014"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


PreviewSource = Callable[[object], "str | None"]   # a job's status -> the URL of its latest preview, or None
PREVIEWED = ("running", "cancelled")   # a done job has its video; a cancelled one shows what it had become


def queue_html(statuses, preview_src: PreviewSource | None = None) -> str:
    """The queue (statuses in submission order) as a table: one row per job, newest first, with a progress bar
    for the current phase and, below it, a running or cancelled job's latest live preview (`preview_src`)."""
    if not statuses:
        return '<p class="lvs-empty">No jobs yet. Fill in a prompt and press Generate.</p>'
    rows = "".join(_row(s, preview_src) for s in reversed(statuses))
    head = "".join(f"<th>{h}</th>" for h in ("job", "prompt", "state", "phase", "progress", "elapsed", "ETA"))
    return (f'<div class="lvs-queue-wrap"><table class="lvs-queue"><thead><tr>{head}</tr></thead><tbody>{rows}'
            "</tbody></table></div>")


def _row(s, preview_src: PreviewSource | None = None) -> str:
    total = s.total or 0
    bar = (f'<progress value="{s.done or 0}" max="{total}"></progress> {s.done or 0}/{total}' if total
           else '<progress></progress>' if s.state == "running" else "")
    bar += _preview_img(s, preview_src)
    detail = (html.escape(in_page_words(str(s.error))) if s.error else
              html.escape(Path(s.output).name) if s.output else "")
    prompt = html.escape(_short(s.spec.prompt, 60))
    phase = html.escape(s.phase or "") if s.state != "done" else ""   # where a cancelled or failed job stopped
    return (f'<tr class="lvs-job lvs-{s.state}" data-job="{html.escape(str(s.id))}" data-state="{s.state}" '
            f'data-done="{s.done or 0}" data-total="{total}">'
            f"<td>#{html.escape(str(s.id))}</td><td title=\"{html.escape(s.spec.prompt)}\">{prompt}"
            f'<div class="lvs-detail">{detail}</div></td><td>{s.state}</td><td>{phase}</td>'
            f"<td>{bar}</td><td>{duration(s.elapsed_s)}</td>"
            f"<td>{duration(s.eta_s) if s.state == 'running' else ''}</td></tr>")


def _preview_img(s, preview_src: PreviewSource | None) -> str:
    record = getattr(s, "preview", None)
    src = preview_src(s) if preview_src and record and s.state in PREVIEWED else None
    if not src:
        return ""
    step = html.escape(str(record.get("step", "?")))
    return (f'<div class="lvs-preview"><img src="{html.escape(src)}" alt="preview after step {step}" '
            f'title="the video as it looks after step {step}" loading="lazy"></div>')


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def job_choices(statuses) -> list[tuple[str, str]]:
    """(label, id) for the cancel/resume selector, newest first."""
    return [(f"#{s.id} {s.state}: {_short(s.spec.prompt, 40)}", str(s.id)) for s in reversed(statuses)]


def finished_videos(results_dir: Path) -> list[Path]:
    """The mp4 files under results_dir (batches write into subfolders) that have a sidecar (written after the
    video, so the pair is complete), newest first; temporary files of unfinished writes (dot-prefixed) are not
    listed."""
    if not results_dir.is_dir():
        return []
    videos = [p for p in results_dir.rglob("*.mp4") if not p.name.startswith(".") and sidecar_path(p).is_file()]
    return sorted(videos, key=lambda p: p.stat().st_mtime, reverse=True)


def read_sidecar(video: Path) -> dict:
    try:
        return json.loads(sidecar_path(video).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {sidecar_path(video).name}: {e}"}


def caption(video: Path, meta: dict) -> str:
    image = " from an image" if meta.get("kind") == "ti2v" else ""
    return f"{_short(str(meta.get('prompt') or video.stem), 40)} (seed {meta.get('seed', '?')}{image})"


def speed_line(meta: dict) -> str:
    """What the speed levers did in a finished run, in one line, from its sidecar's "speed"; "" without one."""
    speed = meta.get("speed")
    if not isinstance(speed, dict):
        return ""
    n = speed.get("step_cache")   # its counts; None when off
    cache = (f"step cache {n.get('threshold')} ({n.get('cached', 0)} of {n.get('full', 0) + n.get('cached', 0)} "
             "DiT forwards reused)" if isinstance(n, dict) else "step cache off")
    return (f"speed: attention {speed.get('attention', '?')}; matmul {speed.get('matmul', '?')}; {cache}; "
            f"compile {'on' if speed.get('compile') else 'off'}")


def form_from_sidecar(meta: dict, catalog: list[ModelChoice]) -> dict:
    """The form values that reproduce a finished video: what the job asked for (its "arguments": profile, speed
    options) and the sizes and numbers it actually ran with. The model only when it is one of the page's choices
    (else None)."""
    asked = meta.get("arguments") or {}
    if asked.get("demo"):   # the demo of the video's kind (text to video, or image to video)
        model = next((c.key for c in catalog if c.demo and c.kind == meta.get("kind", "t2v")), None)
    else:
        model = next((c.key for c in catalog if c.path is not None and str(c.path) == meta.get("model_dir")), None)
    profile = asked.get("profile") or (meta.get("profile") or {}).get("name")
    ran = (meta.get("speed") or {}).get("options") or {}   # the speed levers as run, for sidecars without them asked
    step_cache = asked.get("step_cache", ran.get("cache"))
    preset = meta.get("preset")
    return {"model": model, "prompt": meta.get("prompt") or "", "negative_prompt": meta.get("negative_prompt") or "",
            "seed": meta.get("seed", SEED), "profile": profile,
            "preset": preset.split("@")[0] if isinstance(preset, str) else None, "steps": meta.get("steps"),
            "guidance_scale": meta.get("guidance_scale", meta.get("cfg")), "shift": meta.get("shift"),
            "attention": asked.get("attention") or "profile", "text_cache": _asked_text_cache(asked),
            "resident_blocks": asked.get("dit_resident_blocks"), "vae_tile": asked.get("vae_tile"),
            "matmul": asked.get("matmul") or "profile", "step_cache": step_cache or None,
            "compile": bool(asked.get("compile", ran.get("compile"))), "motion_score": meta.get("motion_score")}


def _asked_text_cache(asked: dict) -> bool:
    """The text cache setting of a sidecar's arguments; a sidecar written before the option was renamed calls it
    "cache"."""
    return asked.get("text_cache", asked.get("cache", RUN_OPTIONS["text_cache"]))
