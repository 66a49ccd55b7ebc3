"""The live preview in a run (issue 20): `--preview N` / the run option `preview` writes OUT.mp4.preview.webp every
N steps and after the last, offers each to the job queue's listeners, and leaves the video bit-identical; TI2V runs
preview too; bad values are one-line errors; the preview file is one of the run's planned outputs."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_support import run_cli
from conftest import ti2v_fixture
from lowvram_stepvideo.defaults import SpeedOptions
from lowvram_stepvideo.face.job_queue import JobQueue, JobSpec
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.planning import plan
from lowvram_stepvideo.profiles import Preset, load_profile
from lowvram_stepvideo.files.preview_file import preview_path
from lowvram_stepvideo.pipeline.preview import preview_size
from lowvram_stepvideo.run import outputs

TINY = dict(frames=17, height=16, width=32, steps=4)   # 3 latent frames of 1x2 latents


def webp_frames(path) -> tuple[int, tuple[int, int]]:
    with Image.open(path) as im:
        return im.n_frames, im.size


@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_previews_every_n_steps_reach_listeners_and_leave_the_video_bit_identical(tmp_path):
    offered = []
    queue = JobQueue(results_dir=tmp_path, log_line=lambda msg: None,
                     on_preview=lambda job_id, record: offered.append((job_id, record)))
    spec = dict(prompt="a paper boat on a river", seed=3, demo=True, **TINY)
    with_preview = queue.wait(queue.submit(JobSpec(**spec, output=tmp_path / "p.mp4", options={
        "save_latents": tmp_path / "p.safetensors", "preview": 2, "text_cache": False})), 120)
    without = queue.wait(queue.submit(JobSpec(**spec, output=tmp_path / "n.mp4", options={
        "save_latents": tmp_path / "n.safetensors", "text_cache": False})), 120)
    queue.close()
    assert with_preview.state == "done" == without.state, (with_preview.error, without.error)
    path = preview_path(tmp_path / "p.mp4")
    assert [(job_id, r["step"]) for job_id, r in offered] == [(with_preview.id, 2), (with_preview.id, 4)]
    height, width = preview_size((1, 2))
    assert all(r["path"] == str(path) and (r["frames"], r["height"], r["width"]) == (3, height, width)
               for _, r in offered)
    assert with_preview.preview == offered[-1][1] and without.preview is None
    assert webp_frames(path)[1] == (width, height) and 1 <= webp_frames(path)[0] <= 3   # libwebp merges equal frames
    assert not preview_path(tmp_path / "n.mp4").exists()
    assert load_file(str(tmp_path / "p.safetensors"))["latents"].equal(
        load_file(str(tmp_path / "n.safetensors"))["latents"])
    assert (tmp_path / "p.mp4").read_bytes() == (tmp_path / "n.mp4").read_bytes()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_ti2v_run_previews(ti2v_demo_dir, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc, _, err = run_cli(capsys, "--demo", "--image", ti2v_fixture() / "first_image.png", "--prompt", "a fox turns",
                         "--frames", "17", "--height", "16", "--width", "32", "--steps", "3", "--preview", "1",
                         "--no-text-cache", "--output", out)   # (the cache would change what other tests load)
    assert rc == 0, err
    count, size = webp_frames(preview_path(out))
    assert size == preview_size((1, 2))[::-1] and 1 <= count <= 3


def test_a_bad_preview_interval_is_one_line_exit_2(tmp_path, capsys, demo_env):
    rc, _, err = run_cli(capsys, "--demo", "--prompt", "x", "--preview", "-1", "--output", tmp_path / "v.mp4")
    assert rc == 2 and err.splitlines()[-1].startswith("error: preview -1: give a whole number of steps")
    assert not (tmp_path / "v.mp4").exists()
    with pytest.raises(SystemExit) as exit_info:           # argparse's own refusal, like every int flag's
        run_cli(capsys, "--demo", "--prompt", "x", "--preview", "x")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("argument --preview: invalid int value: 'x'")


def test_the_preview_is_a_planned_output(tmp_path):
    planned = outputs.plan_outputs(tmp_path / "v.mp4", preview=True)
    try:
        assert planned.preview == preview_path(tmp_path / "v.mp4") and planned.preview in planned.replaceable
        assert planned.labelled()["its preview"] == planned.preview
    finally:
        planned.release()
    assert outputs.plan_outputs(tmp_path / "w.mp4").preview is None
    with pytest.raises(outputs.OutputError, match="its preview"):
        outputs.plan_outputs(tmp_path / "x.mp4", preview=True, inputs=[preview_path(tmp_path / "x.mp4")])
    preview_path(tmp_path / "y.mp4").write_bytes(b"earlier")       # a default name moves past a taken preview
    name, held = outputs.unique(tmp_path / "y.mp4")
    held.release()
    assert name == tmp_path / "y-2.mp4"


def test_the_memory_plan_counts_what_a_preview_hook_allocates(demo_dir, monkeypatch):
    """The plan traces the pipeline with the preview hook on: what it allocates is counted. The real preview's
    tensors (float32 clean latents and RGB, small frames) come after the DiT forward has freed its activations,
    so they stay under the forward's peak and the plan's number does not move; a hook that allocated more would."""
    folder, profile, preset = open_model_folder(demo_dir), load_profile("cpu"), Preset(34, 64, 96, 1)

    def peak(**kw) -> int:
        return max(s.device_bytes for s in plan._traced(folder, profile, preset, SpeedOptions(), None, **kw)["denoise"])
    without = peak(preview=False)
    assert peak(preview=True) == without
    monkeypatch.setattr(plan, "traced_preview",
                        lambda z: lambda i, latents, v, sigma: torch.empty(2 * without, dtype=torch.uint8,
                                                                           device=latents.device))
    assert peak(preview=True) >= 2 * without


@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_the_api_step_callback_gets_the_preview_frames():
    from lowvram_stepvideo.face.api import StepVideoPipeline
    from lowvram_stepvideo.errors import UsageError
    pipe, got = StepVideoPipeline(demo=True, log=lambda msg: None, text_cache=False), []
    size = dict(num_frames=17, height=16, width=32, num_inference_steps=3, seed=5, output_type="latent")
    latents = pipe("a red kite", preview=2, preview_callback=lambda step, frames: got.append((step, frames)), **size)
    assert [step for step, _ in got] == [2, 3]
    height, width = preview_size((1, 2))
    assert all(f.dtype == torch.uint8 and tuple(f.shape) == (3, height, width, 3) for _, f in got)
    assert latents.equal(pipe("a red kite", **size))
    with pytest.raises(UsageError, match="together"):
        pipe("a red kite", preview=2, **size)
