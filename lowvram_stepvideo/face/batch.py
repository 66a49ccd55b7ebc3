"""Batches: many prompts, the text phase once for all of them, then each video in turn through the job queue.

Prompts file: UTF-8, one prompt per line; blank lines and lines starting with '#' are skipped. A line may end with
` --seed N` to give that prompt its own seed, and (Step-Video-TI2V) start with `image=PATH ` to give its first image
(PATH relative to the prompts file; in double quotes when it holds spaces; lines without one take --image). Every other prompt is generated once per seed of `--seeds 1,2,3`
(default: `--seed`, 0). Videos are named `<line>-<prompt start>-seed<N>.mp4` in the output folder, so a rerun of
the same command finds them: a finished video whose sidecar matches the request and the weights is skipped, an
interrupted one continues from its checkpoint, the rest run (--overwrite: all of them again, from the start). One
prompt failing is recorded and the batch goes on. With --no-text-cache the shared embeddings live in a temporary
folder for the batch's duration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..defaults import SEED
from ..run import outputs, preflight
from ..run.job import encode_all_with_fallback, prepare_job, prepare_request
from ..errors import StepVideoError, UsageError
from ..files.fsutil import atomic_path
from .job_queue import JobQueue
from ..loading.model_folder import ModelFolder
from ..run.oom import one_line_oom
from ..run.preflight import JobSpec
from ..run.warm import KeptDiT

SEED_SUFFIX = re.compile(r"\s--seed\s+(-?\d+)\s*$")
IMAGE_PREFIX = re.compile(r'^image=(?:"([^"]+)"|(\S+))\s+')
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class BatchItem:
    line: int              # 1-based line of the prompts file (position in a list)
    prompt: str
    seed: int
    image: Path | None = None   # TI2V: the line's first image (None: the batch's --image)


@dataclass
class Row:
    """One video of the summary."""
    line: int
    prompt: str
    seed: int
    output: str
    state: str = "pending"   # done | skipped (finished before) | failed | cancelled | pending (not reached)
    preset: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)   # per phase: denoise, decode (and text if its own)
    error: str | None = None
    image: str | None = None   # TI2V: the line's first image


@dataclass
class BatchReport:
    rows: list[Row]
    text_seconds: float        # the shared text phase
    summary: Path | None       # the JSON file

    @property
    def ok(self) -> bool:
        return all(r.state in ("done", "skipped") for r in self.rows)


# ---- reading prompts ---------------------------------------------------------------------------------------------

def read_prompts_file(path: Path, seeds: list[int] | None = None, default_seed: int = SEED) -> list[BatchItem]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read --prompts-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompts-file {path} is not UTF-8 text; save it as UTF-8") from None
    lines = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1)]
    items = _items([(i, ln) for i, ln in lines if ln and not ln.startswith("#")], seeds, default_seed,
                   Path(path).parent)
    if not items:
        raise UsageError(f"--prompts-file {path} has no prompts (one per line; '#' starts a comment line)")
    return items


def items_from_prompts(prompts: list[str], seeds: list[int] | None = None,
                       default_seed: int = SEED) -> list[BatchItem]:
    items = _items([(i, p.strip()) for i, p in enumerate(prompts, 1)], seeds, default_seed)
    if not items or any(not it.prompt for it in items):
        raise UsageError("every prompt of a batch must be non-empty text")
    return items


def _items(lines: list[tuple[int, str]], seeds: list[int] | None, default_seed: int,
           folder: Path | None = None) -> list[BatchItem]:
    out = []
    for line, text in lines:
        image = None
        m = IMAGE_PREFIX.match(text) if folder is not None else None
        if m:
            image, text = folder / (m[1] or m[2]), text[m.end():]
        m = SEED_SUFFIX.search(text)
        if m:
            out.append(BatchItem(line, text[:m.start()].strip(), int(m[1]), image))
        else:
            out += [BatchItem(line, text, s, image) for s in (seeds or [default_seed])]
    return out


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise UsageError("--seeds is empty; give integers separated by commas, e.g. --seeds 0,1,2")
    return seeds


def item_output(out_dir: Path, item: BatchItem) -> Path:
    """`<line>-<prompt start>-seed<N>.mp4`: the prompt's letters of any script (outputs.name_words)."""
    name = outputs.name_words(item.prompt, 40) or "prompt"
    return Path(out_dir) / f"{item.line:04d}-{name}-seed{item.seed}.mp4"


# ---- running -----------------------------------------------------------------------------------------------------

def run_batch(items: list[BatchItem], base: JobSpec, out_dir: Path, log: Callable[[str], None],
              folder: ModelFolder | None = None, queue: JobQueue | None = None,
              inputs: tuple[Path, ...] = (), kept: KeptDiT | None = None) -> BatchReport:
    """Every item through the job queue after one shared text phase; Ctrl-C stops the running video after its
    step (checkpoint saved) and leaves the rest pending. The summary is printed and written to out_dir. No output
    of the batch (videos, sidecars, checkpoints, the summary) may overwrite one of `inputs` (the prompts file), the
    profile or a model file: the summary's is refused before any work, a video's fails that video. The DiT is
    kept warm between the videos when the plan says RAM allows (`kept`: an API pipeline's keeper to share)."""
    out_dir = Path(out_dir)
    _make_dir(out_dir)
    folder = folder or preflight.model_folder(base)
    rows = [Row(it.line, it.prompt, it.seed, str(item_output(out_dir, it)), image=it.image and str(it.image))
            for it in items]
    report = BatchReport(rows, 0.0, out_dir / SUMMARY_NAME)
    _check_summary(report.summary, [*inputs, preflight.profile_for(base, need_device=False).path], folder.root)
    with _embedding_cache(base) as base:
        specs = [_spec(base, it, out_dir) for it in items]
        todo = _check_all(specs, rows, folder, log, tuple(inputs))
        report.text_seconds = _shared_text_phase([specs[i] for i in todo], folder, log)
        try:
            _run_all([specs[i] for i in todo], [rows[i] for i in todo], queue, log, kept)
        except KeyboardInterrupt:
            _finish(report, log)
            log("batch: interrupted; run the same command again to continue (finished videos are skipped, the "
                "interrupted one resumes from its checkpoint)")
            raise
    _finish(report, log)
    return report


def _make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --output-dir {out_dir}: {e.strerror or e}") from None
    preflight.check_writable(out_dir / SUMMARY_NAME)


def _check_summary(summary: Path, inputs: list[Path], model_root: Path) -> None:
    """The summary replaces only an earlier batch's summary: never an input, a model file or another file."""
    for path in [*inputs, *outputs.model_files(model_root)]:
        if path is not None and outputs.same_file(summary, path):
            raise UsageError(f"the batch summary {summary} would overwrite {path}; choose another --output-dir")
    if summary.exists() and not _is_summary(summary):
        raise UsageError(f"{summary} exists and is not a batch summary; the batch would replace it with its "
                         "summary: move it or choose another --output-dir")


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("videos"), list) and "text_seconds" in data


def _finish(report: BatchReport, log) -> None:
    """Write the summary, then print its table; a failed write (disk full: any error of the writer) is a warning
    under the table, and the batch's exit status stays that of its videos."""
    failed = None
    try:
        write_summary(report)
    except Exception as e:
        failed = f"warning: could not write {report.summary} ({_reason(e)}); the table above is all of the summary"
        report.summary = None
    log(summary_table(report))
    if failed:
        log(failed)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def _embedding_cache(base: JobSpec):
    """The batch hands its embeddings to the videos through the text-embedding cache: a temporary one without
    text_cache."""
    if preflight.run_options(base)["text_cache"]:
        yield base
        return
    with tempfile.TemporaryDirectory(prefix="lowvram-batch-embeddings-") as tmp:
        yield dataclasses.replace(base, options={**base.options, "text_cache": True, "text_cache_dir": tmp})


def _spec(base: JobSpec, item: BatchItem, out_dir: Path) -> JobSpec:
    """With overwrite every video is made again from the start; without, an interrupted one resumes."""
    resume = False if preflight.run_options(base)["overwrite"] else "auto"
    return dataclasses.replace(base, prompt=item.prompt, seed=item.seed, output=item_output(out_dir, item),
                               image=item.image if item.image is not None else base.image,
                               options={**base.options, "resume": resume, "save_latents": None})


def _check_all(specs: list[JobSpec], rows: list[Row], folder: ModelFolder, log,
               inputs: tuple[Path, ...]) -> list[int]:
    """Pre-flight of every video; finished ones are marked skipped, bad ones failed (an existing file that is not
    this request's video is kept, an input is never written over: outputs.py refuses them). The indexes left to
    run."""
    todo = []
    for i, (spec, row) in enumerate(zip(specs, rows)):
        try:
            job = prepare_request(spec, log, folder=folder)
            fingerprint = job.request.fingerprint(folder.root, job.pipe.profile.compute_dtype)
            finished = outputs.finished_sidecar(spec.output, fingerprint)
            if finished and not job.options["overwrite"]:
                row.state, row.preset, row.seconds = "skipped", finished.get("preset"), finished.get("timings_s", {})
                continue
            prepare_job(spec, log, folder=folder, inputs=inputs).release()   # claimed again when it runs
            todo.append(i)
        except StepVideoError as e:
            row.state, row.error = "failed", str(e)
    return todo


def _shared_text_phase(specs: list[JobSpec], folder: ModelFolder, log) -> float:
    """Encode every prompt in one text phase (step_llm loaded once) into the embedding cache the videos read."""
    if not specs:
        return 0.0
    start = time.perf_counter()
    job = prepare_request(specs[0], log, folder=folder)
    pipe, options = job.pipe, job.options
    pipe.cache = pipe.embedding_cache(options["text_cache_dir"])
    log(f"text: {len(specs)} prompt{'s' * (len(specs) > 1)} in one text phase")
    try:
        with one_line_oom():
            encode_all_with_fallback(pipe, [(s.prompt, s.negative_prompt) for s in specs])
    except StepVideoError as e:   # each video then tries its own text phase and records what happens
        log(f"text: the shared text phase failed ({e}); each video encodes its own prompt")
    return time.perf_counter() - start


def _run_all(specs: list[JobSpec], rows: list[Row], queue: JobQueue | None, log, kept=None) -> None:
    own = queue is None
    queue = queue or JobQueue(log_line=log, kept=kept)
    ids = [queue.submit(s) for s in specs]
    try:
        for job_id, row in zip(ids, rows):
            _record(queue.wait(job_id), row)
    except KeyboardInterrupt:
        for job_id in ids:
            queue.cancel(job_id)
        for job_id, row in zip(ids, rows):
            _record(queue.wait(job_id, timeout=600), row)
        raise
    finally:
        if own:
            queue.close()


def _record(status, row: Row) -> None:
    row.state = status.state if status.state != "queued" else "pending"
    row.error = status.error
    if status.result is not None:
        row.preset = str(status.result.preset)
        row.seconds = {k: round(v, 2) for k, v in status.result.timings.items()}


# ---- summary -----------------------------------------------------------------------------------------------------

def write_summary(report: BatchReport) -> None:
    data = {"ok": report.ok, "text_seconds": round(report.text_seconds, 2),
            "videos": [dataclasses.asdict(r) for r in report.rows]}
    with atomic_path(report.summary, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def summary_table(report: BatchReport) -> str:
    head = (f"{'line':>4} {'seed':>6}  {'prompt':<32} {'state':<9} {'denoise s':>9} {'decode s':>8}  {'preset':<14} "
            "output / error")
    lines = [f"batch: text phase {report.text_seconds:.1f} s for all prompts", head]
    for r in report.rows:
        what = r.error if r.error and r.state != "done" else Path(r.output).name
        seconds = f"{r.seconds.get('denoise', 0):>9.1f} {r.seconds.get('decode', 0):>8.1f}"
        lines.append(f"{r.line:>4} {r.seed:>6}  {column(r.prompt, 32)} {r.state:<9} {seconds}  {r.preset or '-':<14} "
                     f"{what}")
    done = sum(r.state in ("done", "skipped") for r in report.rows)
    where = f"summary in {report.summary}" if report.summary else "no summary file"
    lines.append(f"batch: {done} of {len(report.rows)} videos finished; {where}")
    return "\n".join(lines)


def column(text: str, width: int) -> str:
    """`text` on one line, cut (ending in '~') or padded to `width` terminal columns: Chinese, Japanese and Korean
    characters (and other wide ones) take two columns, combining marks none."""
    text = " ".join(text.split())
    if sum(map(_cells, text)) > width:
        out, used = "", 1   # the '~'
        for c in text:
            if used + _cells(c) > width:
                break
            out, used = out + c, used + _cells(c)
        text = out + "~"
    return text + " " * (width - sum(map(_cells, text)))


def _cells(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
