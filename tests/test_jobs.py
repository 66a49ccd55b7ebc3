"""The job queue (one worker thread, cancel / resume) and run/job.py's run_job driven through it on the demo model."""
import threading

import numpy as np
import pytest
from safetensors.torch import load_file

from cli_support import read_frames
from lowvram_stepvideo.run import job
from lowvram_stepvideo.errors import StepVideoError
from lowvram_stepvideo.face.job_queue import JobQueue, JobSpec
from lowvram_stepvideo.run.resume import checkpoint_path

TINY = dict(frames=17, height=16, width=16, steps=4)


def fake_worker(log: list, gate: threading.Event | None = None):
    """Records the prompts it runs; 'fail' fails, 'loop' runs steps until stopped, others wait for `gate`."""
    def work(spec, events):
        log.append(spec.prompt)
        events.phase("denoise")
        if spec.prompt == "fail":
            raise StepVideoError("bad prompt")
        if spec.prompt == "loop":
            for step in range(1000):
                events.progress("denoise", step, 1000)
                if events.should_stop():
                    raise job.Interrupted(spec.output, step)
                threading.Event().wait(0.01)
        if gate is not None:
            gate.wait(10)
        return job.JobResult(spec.output, None, {}, 0.0)
    return work


def test_jobs_run_in_order_and_a_failure_does_not_stop_the_queue(tmp_path):
    ran = []
    queue = JobQueue(worker=fake_worker(ran), results_dir=tmp_path)
    ids = [queue.submit(JobSpec(p)) for p in ("one", "fail", "three")]
    states = [queue.wait(i, timeout=10) for i in ids]
    queue.close()
    assert ran == ["one", "fail", "three"]
    assert [s.state for s in states] == ["done", "failed", "done"]
    assert states[1].error == "bad prompt" and states[0].error is None
    assert all(s.output.parent == tmp_path and s.output.suffix == ".mp4" for s in states)


def test_cancel_drops_a_queued_job_and_stops_a_running_one(tmp_path):
    ran, gate = [], threading.Event()
    queue = JobQueue(worker=fake_worker(ran, gate), results_dir=tmp_path)
    running, queued = queue.submit(JobSpec("loop")), queue.submit(JobSpec("never"))
    while queue.get(running).phase != "denoise" or queue.get(running).done < 2:
        threading.Event().wait(0.01)
    assert queue.get(running).state == "running" and queue.get(running).total == 1000
    queue.cancel(queued)
    queue.cancel(running)
    assert queue.wait(running, timeout=10).state == "cancelled"
    assert queue.wait(queued, timeout=1).state == "cancelled" and ran == ["loop"]
    with pytest.raises(StepVideoError, match="only a cancelled or failed job"):
        queue.resume(queue.submit(JobSpec("x")))
    gate.set()
    queue.close()


def test_a_queue_started_again_lists_the_unfinished_jobs_and_resumes_them(tmp_path):
    """keep_jobs (the web page): queued, running and cancelled jobs come back as cancelled jobs after a restart;
    done and failed ones do not; a damaged job file is left alone with one line."""
    ran, lines = [], []
    queue = JobQueue(worker=fake_worker(ran), results_dir=tmp_path, keep_jobs=True, log_line=lines.append)
    done = queue.wait(queue.submit(JobSpec("one", seed=7, options={"vae_tile": 8})), timeout=10)
    failed = queue.wait(queue.submit(JobSpec("fail")), timeout=10)
    running = queue.submit(JobSpec("loop", demo=True, steps=3))
    queued = queue.submit(JobSpec("two", negative_prompt="blur", frames=17))
    while queue.get(running).done < 2:
        threading.Event().wait(0.01)
    queue.close()                                        # as the page stops: the running job saves its checkpoint
    assert done.state == "done" and failed.state == "failed"
    (tmp_path / ".broken.mp4.job.json").write_text("{")
    again = JobQueue(worker=fake_worker(ran), results_dir=tmp_path, keep_jobs=True, log_line=lines.append)
    listed = again.jobs()
    assert [(s.spec.prompt, s.state) for s in listed] == [("loop", "cancelled"), ("two", "cancelled")]
    assert [s.spec for s in listed] == [queue.get(running).spec, queue.get(queued).spec]
    assert "Resume continues it" in listed[0].error and any("broken.mp4.job.json" in ln for ln in lines)
    resumed = again.wait(again.resume(listed[1].id), timeout=10)
    assert resumed.state == "done" and resumed.spec.options == {"resume": "auto"}
    assert resumed.output == listed[1].output and ran[-1] == "two"
    again.close()
    kept = sorted(f.name for f in tmp_path.glob(".*.job.json"))
    assert kept == [".broken.mp4.job.json", f".{listed[0].output.name}.job.json"]   # done now: forgotten


class StopAfter(job.Events):
    """Asks the run to stop once `steps` denoising steps are done."""

    def __init__(self, inner, steps: int):
        self.inner, self.steps, self.asked = inner, steps, 0

    def phase(self, name):
        self.inner.phase(name)

    def progress(self, desc, done, total):
        self.inner.progress(desc, done, total)

    def log(self, msg):
        self.inner.log(msg)

    def should_stop(self):
        self.asked += 1
        return self.asked >= self.steps or self.inner.should_stop()


@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_a_cancelled_job_resumes_to_the_uninterrupted_result(tmp_path):
    """run_job through the queue: stopped after step 2 (checkpoint saved), resumed, identical to a straight run."""
    first = {"n": 0}

    def worker(spec, events):
        first["n"] += 1
        return job.run_job(spec, StopAfter(events, 2) if first["n"] == 2 else events)

    queue, lines = JobQueue(worker=worker, results_dir=tmp_path, log_line=lambda msg: None), []
    spec = dict(prompt="a paper boat on a river", seed=3, demo=True, **TINY)
    straight = queue.wait(queue.submit(JobSpec(**spec, output=tmp_path / "straight.mp4",
                                               options={"save_latents": tmp_path / "a.safetensors"})), 120)
    stopped = queue.wait(queue.submit(JobSpec(**spec, output=tmp_path / "v.mp4",
                                              options={"save_latents": tmp_path / "b.safetensors",
                                                       "checkpoint_every": 0})), 120)
    assert straight.state == "done" and straight.result.preset.steps == 4, straight.error
    ckpt = checkpoint_path(tmp_path / "v.mp4")
    assert stopped.state == "cancelled" and stopped.error == (f"interrupted after step 2; saved to {ckpt} "
                                                              "(continue with --resume)")
    assert ckpt.is_file() and not (tmp_path / "v.mp4").exists()
    resumed = queue.wait(queue.resume(stopped.id), 120)
    queue.close()
    assert resumed.state == "done", resumed.error
    assert load_file(str(tmp_path / "a.safetensors"))["latents"].equal(
        load_file(str(tmp_path / "b.safetensors"))["latents"])
    np.testing.assert_array_equal(read_frames(tmp_path / "v.mp4"), read_frames(tmp_path / "straight.mp4"))
    assert not ckpt.exists()
