"""One job queue for batches and the web page: jobs run one at a time in one worker thread.

A running job is cancelled after its current denoising step, with its resume checkpoint saved; `resume(job_id)`
queues it again and it continues from there. The worker is `run.job.run_job(spec, events)` unless another callable
with that signature is given (tests, or a web page that wants to wrap it). With run_job, the queue keeps the DiT
warm between its jobs when the memory plan says RAM allows (run/warm.py; `kept`, dropped when the queue closes).

With `keep_jobs` (the web page), each job is also written next to its output (`.NAME.mp4.job.json`) until it is
done or has failed, so a queue started later on the same results folder lists the jobs that were queued, running
or cancelled when the last one stopped, as cancelled jobs that `resume` continues.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import StepVideoError
from ..files.fsutil import atomic_path
from ..run.outputs import RESULTS, default_name
from ..run.preflight import JobSpec
from ..run.job import Events, Interrupted, JobResult, run_job
from ..run.oom import out_of_memory_line
from ..run.job import say
from ..run.warm import KeptDiT

__all__ = ["JobQueue", "JobSpec", "JobStatus", "JobResult"]
STATES = ("queued", "running", "done", "cancelled", "failed")
FINISHED = ("done", "cancelled", "failed")
INTERRUPTED = "not finished when the queue last stopped; Resume continues it (to forget it, delete {})"
log = logging.getLogger(__name__)


@dataclass
class JobStatus:
    id: str
    spec: JobSpec
    state: str = "queued"
    phase: str | None = None       # plan, text, denoise, decode, write
    done: int = 0                  # progress of the current bar (steps, blocks, tiles)
    total: int | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None     # of the current bar, from its rate so far
    output: Path | None = None
    error: str | None = None
    result: JobResult | None = None
    preview: dict | None = None    # the latest live preview: path, frames, width, height, bytes, step, seconds
    started: float | None = field(default=None, repr=False)
    bar_started: float | None = field(default=None, repr=False)


class _JobEvents(Events):
    """Updates a job's status from the run's events; `stop` is set by cancel()."""

    def __init__(self, status: JobStatus, lock: threading.Lock, log_line: Callable[[str], None],
                 on_preview: Callable[[str, dict], None] | None = None):
        self.status, self.lock, self.stop, self.log_line = status, lock, threading.Event(), log_line
        self.on_preview = on_preview

    def phase(self, name: str) -> None:
        with self.lock:
            self.status.phase, self.status.done, self.status.total, self.status.eta_s = name, 0, None, None

    def progress(self, desc: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        with self.lock:
            s = self.status
            if done == 0 or s.bar_started is None or done < s.done:
                s.bar_started = now
            s.done, s.total = done, total
            rate = done / (now - s.bar_started) if done and now > s.bar_started else None
            s.eta_s = (total - done) / rate if rate and total else None

    def log(self, msg: str) -> None:
        self.log_line(f"[{self.status.id}] {msg}")

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def preview(self, record: dict) -> None:
        with self.lock:
            self.status.preview = dict(record)
        if self.on_preview:
            self.on_preview(self.status.id, dict(record))


class JobQueue:
    def __init__(self, worker: Callable[[JobSpec, Events], JobResult] | None = None,
                 results_dir: Path = RESULTS, log_line: Callable[[str], None] | None = None,
                 keep_jobs: bool = False, on_preview: Callable[[str, dict], None] | None = None,
                 kept: KeptDiT | None = None):
        """`on_preview(job_id, record)`: called from the worker thread after each live preview a job writes (its
        run option `preview`); the latest is also in the job's status. `kept`: the DiT keeper to share (an API
        pipeline's); by default the queue has its own."""
        self.worker, self.results_dir = worker or self._run_job, Path(results_dir)
        self.on_preview = on_preview
        self._own_kept = kept is None and worker is None
        self.kept = KeptDiT() if self._own_kept else kept
        self.log_line = log_line or say
        self.keep_jobs = keep_jobs
        self._lock = threading.RLock()              # guards every JobStatus; _wake signals changes
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, JobStatus] = {}
        self._events: dict[str, _JobEvents] = {}
        self._pending: list[str] = []
        self._ids = itertools.count(1)
        self._closed = False
        if keep_jobs:
            self._reload()
        self._thread = threading.Thread(target=self._work, name="lowvram-jobs", daemon=True)
        self._thread.start()

    # ---- the interface -------------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        """Queue a job; its output path is fixed now (results_dir/<prompt>-<time>-<job id>.mp4 when not given)."""
        with self._wake:
            if self._closed:
                raise StepVideoError("the job queue is closed")
            job_id = f"job-{next(self._ids)}"
            if spec.output is None:
                name = f"{Path(default_name(spec.prompt or '')).stem}-{job_id}.mp4"
                spec = dataclasses.replace(spec, output=self.results_dir / name)
            if self.keep_jobs:               # before the worker can see it (it forgets the file once done)
                self._keep(spec)
            self._jobs[job_id] = JobStatus(job_id, spec, output=Path(spec.output))
            self._pending.append(job_id)
            self._wake.notify()
        return job_id

    def cancel(self, job_id: str) -> None:
        """A queued job is dropped; a running one stops after its current step, its resume checkpoint saved."""
        with self._wake:
            status = self._status(job_id)
            if status.state == "queued":
                self._pending.remove(job_id)
                status.state = "cancelled"
                self._wake.notify_all()
            elif status.state == "running":
                self._events[job_id].stop.set()

    def resume(self, job_id: str) -> str:
        """Queue a cancelled or failed job again; it continues from its checkpoint when there is one."""
        status = self._status(job_id)
        if status.state not in ("cancelled", "failed"):
            raise StepVideoError(f"{job_id} is {status.state}; only a cancelled or failed job can be resumed")
        options = {**status.spec.options, "resume": "auto"}
        return self.submit(dataclasses.replace(status.spec, options=options))

    def jobs(self) -> list[JobStatus]:
        with self._lock:
            now = time.monotonic()
            for s in self._jobs.values():
                if s.state == "running" and s.started is not None:
                    s.elapsed_s = now - s.started
            return [dataclasses.replace(s) for s in self._jobs.values()]

    def get(self, job_id: str) -> JobStatus:
        return next(s for s in self.jobs() if s.id == job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """The job's status once it has finished, or after `timeout` seconds, whichever comes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._status(job_id).state not in FINISHED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._wake.wait(left)
        return self.get(job_id)

    def close(self) -> None:
        """Drop the queued jobs, stop the running one (checkpoint saved) and end the worker."""
        with self._wake:
            self._closed = True
            for job_id in list(self._pending):
                self._pending.remove(job_id)
                self._jobs[job_id].state = "cancelled"
            for events in self._events.values():
                events.stop.set()
            self._wake.notify_all()
        self._thread.join()
        if self._own_kept:
            self.kept.drop()             # its RAM back now, not whenever the queue is collected

    # ---- the worker ----------------------------------------------------------------------------------------------

    def _run_job(self, spec: JobSpec, events: Events) -> JobResult:
        return run_job(spec, events, kept=self.kept)

    def _status(self, job_id: str) -> JobStatus:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise StepVideoError(f"no job {job_id!r}") from None

    def _next(self) -> str | None:
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if not self._pending:
                return None
            job_id = self._pending.pop(0)
            status = self._jobs[job_id]
            status.state, status.started = "running", time.monotonic()
            self._events[job_id] = _JobEvents(status, self._lock, self.log_line, self.on_preview)
            return job_id

    def _work(self) -> None:
        while (job_id := self._next()) is not None:
            status, events = self._jobs[job_id], self._events[job_id]
            state, error, result = self._run(status.spec, events)
            if self.keep_jobs and state != "cancelled":
                job_file(status.output).unlink(missing_ok=True)
            with self._wake:
                status.state, status.error, status.result = state, error, result
                status.elapsed_s = time.monotonic() - status.started
                status.eta_s = None
                del self._events[job_id]
                self._wake.notify_all()

    def _run(self, spec: JobSpec, events: _JobEvents) -> tuple[str, str | None, JobResult | None]:
        try:
            return "done", None, self.worker(spec, events)
        except Interrupted as e:
            return "cancelled", str(e), None
        except KeyboardInterrupt:   # stopped, but the checkpoint could not be written (see the log)
            return "cancelled", "stopped; its checkpoint could not be saved (see the log)", None
        except StepVideoError as e:
            return "failed", str(e), None
        except Exception as e:
            if out_of_memory_line(e):
                return "failed", out_of_memory_line(e), None
            # a bug: recorded with its traceback in the log, the queue goes on
            log.exception("job failed")
            return "failed", f"{type(e).__name__}: {e}", None

    # ---- kept jobs -----------------------------------------------------------------------------------------------

    def _keep(self, spec: JobSpec) -> None:
        try:
            with atomic_path(job_file(spec.output)) as tmp:
                tmp.write_text(json.dumps(spec_to_dict(spec), indent=1))
        except OSError as e:   # the job runs anyway; only a restart would not list it
            self.log_line(f"warning: cannot keep the job in {job_file(spec.output)} ({e.strerror or e})")

    def _reload(self) -> None:
        """The jobs an earlier queue kept in results_dir, oldest first, as cancelled jobs."""
        files = sorted(self.results_dir.glob(".*.job.json"), key=lambda f: f.stat().st_mtime)
        for f in files:
            try:
                spec = spec_from_dict(json.loads(f.read_text()))
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                self.log_line(f"warning: {f} is not a job this page can list again ({e}); left alone")
                continue
            if Path(spec.output).exists():     # finished just before the stop
                f.unlink(missing_ok=True)
                continue
            job_id = f"job-{next(self._ids)}"
            self._jobs[job_id] = JobStatus(job_id, spec, state="cancelled", output=Path(spec.output),
                                           error=INTERRUPTED.format(f))


def job_file(output: Path) -> Path:
    """Where a kept job is written: hidden, next to its output."""
    output = Path(output)
    return output.with_name(f".{output.name}.job.json")


def spec_to_dict(spec: JobSpec) -> dict:
    d = dataclasses.asdict(spec)
    for key in ("model_dir", "output", "image"):   # (the page's images are files)
        d[key] = None if d[key] is None else str(d[key])
    d["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in spec.options.items()}
    return d


def spec_from_dict(d: dict) -> JobSpec:
    names = {f.name for f in dataclasses.fields(JobSpec)}
    unknown = set(d) - names
    if unknown or not isinstance(d.get("prompt"), str) or not isinstance(d.get("options", {}), dict):
        raise ValueError(f"unexpected fields {sorted(unknown)}" if unknown else "no prompt or options")
    spec = JobSpec(**d)
    return dataclasses.replace(spec, model_dir=None if spec.model_dir is None else Path(spec.model_dir),
                               output=Path(spec.output), image=None if spec.image is None else Path(spec.image))
