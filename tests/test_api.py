"""The Python API runs generate.py's path: the same one-line errors (as StepVideoError), OOM step-down, resume when
asked, the same latents as the CLI, batches."""
import pytest
import torch
from safetensors.torch import load_file

import lowvram_stepvideo
from cli_support import run_cli
from lowvram_stepvideo.face import api
from lowvram_stepvideo.run import job
from lowvram_stepvideo.errors import StepVideoError, UsageError
from lowvram_stepvideo.loading.model_folder import ModelFolderError
from lowvram_stepvideo.pipeline.machine import DeviceRuntime
from lowvram_stepvideo.profiles import Preset

pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")
SIZE = dict(num_frames=17, height=16, width=32, num_inference_steps=4, seed=5)


def test_the_package_exports_the_api():
    assert lowvram_stepvideo.StepVideoPipeline is api.StepVideoPipeline
    assert lowvram_stepvideo.StepVideoError is StepVideoError and issubclass(ModelFolderError, StepVideoError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_profile_without_a_gpu_is_refused_with_the_cli_message(demo_dir, capsys):
    rc, _, err = run_cli(capsys, "--model-dir", demo_dir, "--profile", "24gb", "--prompt", "a cat")
    with pytest.raises(StepVideoError) as info:
        lowvram_stepvideo.StepVideoPipeline.from_pretrained(demo_dir, profile="24gb")
    assert rc == 2 and err == f"error: {info.value}"
    assert str(info.value).startswith("profile '24gb' needs a CUDA GPU and none was found")


def test_bad_input_raises_one_line_step_video_errors(demo_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="not found") as info:
        api.StepVideoPipeline.from_pretrained(tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu")
    with pytest.raises(UsageError, match="--prompt is empty"):
        pipe(prompt="  ")
    with pytest.raises(UsageError, match="output_type 'png'"):
        pipe(prompt="a cat", output_type="png")
    with pytest.raises(UsageError, match="resume=True needs checkpoint=PATH"):
        pipe(prompt="a cat", resume=True)


def test_the_api_gives_the_cli_latents_and_resumes_when_asked(demo_dir, tmp_path, capsys, monkeypatch):
    prompt = "a kite above the dunes"
    rc, _, err = run_cli(capsys, "--model-dir", demo_dir, "--profile", "cpu", "--prompt", prompt, "--seed", "5",
                         "--frames", "17", "--height", "16", "--width", "32", "--steps", "4",
                         "--output", tmp_path / "cli.mp4", "--save-latents", tmp_path / "cli.safetensors")
    assert rc == 0, err
    cli_latents = load_file(str(tmp_path / "cli.safetensors"))["latents"]
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu")
    assert torch.equal(pipe(prompt=prompt, output_type="latent", **SIZE), cli_latents)

    forwards, original, hooked = [], DeviceRuntime.load, set()

    def load(self, component, dtype):   # Ctrl-C at the DiT's 5th forward (cpu profile: two per step)
        model = original(self, component, dtype)
        if component == "transformer" and id(model) not in hooked:   # (a DiT kept between calls is hooked once)
            hooked.add(id(model))
            model.register_forward_pre_hook(lambda *_: forwards.append(1) or (
                _raise(KeyboardInterrupt) if len(forwards) == 5 else None))
        return model
    monkeypatch.setattr(DeviceRuntime, "load", load)
    ckpt = tmp_path / "kite.resume.safetensors"
    with pytest.raises(job.Interrupted, match="interrupted after step 2"):
        pipe(prompt=prompt, output_type="latent", checkpoint=ckpt, **SIZE)
    assert ckpt.is_file()
    resumed = pipe(prompt=prompt, output_type="latent", checkpoint=ckpt, resume=True, **SIZE)
    assert torch.equal(resumed, cli_latents) and len(forwards) == 5 + 4 and not ckpt.exists()


def _raise(exc):
    raise exc


def test_the_api_steps_down_the_ladder_on_out_of_memory(demo_dir, monkeypatch):
    big, small = Preset(34, 64, 96, 2), Preset(17, 16, 16, 2)
    original = job.denoise

    def denoise(pipe, req, *args, **kwargs):
        if req.preset.tokens > small.tokens:
            raise torch.OutOfMemoryError("injected")
        return original(pipe, req, *args, **kwargs)
    monkeypatch.setattr(job, "denoise", denoise)
    said = []
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu", presets=[big, small], log=said.append)
    frames = pipe(prompt="a heron in the reeds", num_frames=34, height=64, width=96, num_inference_steps=2)
    assert pipe.last_preset == small and frames.shape == (17, 16, 16, 3)
    assert f"denoise: out of memory at {big}; memory freed, retrying at {small}" in said


@pytest.mark.slow
def test_generate_many_from_python(demo_dir, tmp_path):
    pipe = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu", log=lambda msg: None)
    report = pipe.generate_many(["an owl at dusk", "a canoe at dawn"], tmp_path / "out", seeds=[1],
                                frames=17, height=16, width=16, steps=1)
    assert report.ok and [r.state for r in report.rows] == ["done", "done"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == [
        "0001-an_owl_at_dusk-seed1.mp4", "0002-a_canoe_at_dawn-seed1.mp4"]
