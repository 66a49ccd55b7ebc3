"""The whole pipeline against the reference run in pipeline_io.safetensors (profile cpu, float32)."""
import json

import pytest
import torch

from conftest import complete_model_dir, read_io
from lowvram_stepvideo.pipeline.phases import PhasePipeline


@pytest.fixture
def reference(fixture_dir):
    tensors, meta = read_io(fixture_dir / "pipeline_io.safetensors")
    return tensors, json.loads(meta["call"])


@pytest.fixture
def model_dir(fixture_dir, tmp_path):
    return complete_model_dir(fixture_dir, tmp_path)


@pytest.fixture
def pipe(model_dir):
    return PhasePipeline.open(model_dir, profile="cpu", progress=False)


def _embeds(io):
    return io["caption.y"], io["caption.y_mask"], io["caption.clip_embedding"]


def test_latents_after_every_step_match_reference(pipe, reference):
    io, call = reference
    seen = {}
    pipe(prompt_embeds=_embeds(io), latents=io["step0.latents_in"], num_frames=call["num_frames"],
         height=call["height"], width=call["width"], num_inference_steps=call["steps"],
         guidance_scale=call["guidance"], time_shift=call["time_shift"], output_type="latent",
         step_callback=lambda done, latents: seen.__setitem__(done, latents.clone()))
    assert sorted(seen) == list(range(1, call["steps"] + 1))
    for i in range(call["steps"]):
        torch.testing.assert_close(seen[i + 1].cpu(), io[f"step{i}.latents_out"], atol=1e-4, rtol=0)


def test_frames_match_reference(pipe, reference):
    io, call = reference
    frames = pipe(prompt_embeds=_embeds(io), latents=io["step0.latents_in"], num_frames=call["num_frames"],
                  height=call["height"], width=call["width"], num_inference_steps=call["steps"],
                  guidance_scale=call["guidance"], time_shift=call["time_shift"], output_type="uint8")
    frames, expected = torch.as_tensor(frames), io["out.frames_uint8"]
    assert frames.shape == expected.shape and frames.dtype == torch.uint8
    assert (frames.int() - expected.int()).abs().max() <= 1


def test_sequential_cfg_equals_batched(model_dir, reference):
    from lowvram_stepvideo.profiles import load_profile, with_overrides
    io, call = reference
    kwargs = dict(prompt_embeds=_embeds(io), latents=io["step0.latents_in"], num_frames=call["num_frames"],
                  height=call["height"], width=call["width"], num_inference_steps=2, output_type="latent")
    outs = []
    for mode in ("batch", "sequential"):
        profile = with_overrides(load_profile("cpu"), cfg_mode=mode)
        pipe = PhasePipeline.open(model_dir, profile=profile, progress=False)
        outs.append(pipe(**kwargs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)   # same math, other summation order


def test_decode_alone_matches_reference_vae(pipe, reference):
    io, _ = reference
    video = pipe.decode(io["vae.in.latents"])
    torch.testing.assert_close(video, io["vae.out.video"], atol=1e-4, rtol=0)


def test_pipeline_schedule_is_the_reference_one(model_dir, reference):
    """The pipeline feeds the DiT exactly the reference's timesteps (the schedule file is checked in test_sampling)."""
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.profiles import load_profile
    from lowvram_stepvideo.pipeline.machine import DeviceRuntime
    io, call = reference
    seen = []

    class Recording(DeviceRuntime):
        def load(self, component, dtype):
            model = super().load(component, dtype)
            if component == "transformer":
                model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["timestep"][0].item()) if kw
                                                else seen.append(args[1][0].item()), with_kwargs=True)
            return model
    folder, profile = open_model_folder(model_dir), load_profile("cpu")
    pipe = PhasePipeline(folder, profile, progress=False, runtime=Recording(folder, profile))
    pipe(prompt_embeds=_embeds(io), latents=io["step0.latents_in"], num_frames=call["num_frames"],
         height=call["height"], width=call["width"], num_inference_steps=call["steps"],
         guidance_scale=call["guidance"], time_shift=call["time_shift"], output_type="latent")
    expected = [io[f"step{i}.t"].item() for i in range(call["steps"])]
    per_step = len(seen) // len(expected)                # 1 forward per step (CFG batched) or 2 (sequential)
    assert per_step in (1, 2) and seen == [t for t in expected for _ in range(per_step)]


def test_empty_prompt_is_refused(pipe):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe(prompt="   ", num_frames=17, height=32, width=48, num_inference_steps=1)


def test_with_profile_runs_another_profile_and_leaves_the_pipeline_as_it_is(demo_dir, one_torch_thread):
    """A lowered profile runs through a new pipeline sharing the folder, the cache and the runtime's state; the
    pipeline it came from keeps its profile, which nothing can set."""
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    from lowvram_stepvideo.profiles import load_profile, with_overrides
    folder, sequential = open_model_folder(demo_dir), load_profile("cpu")
    batched = with_overrides(sequential, cfg_mode="batch")
    pipe = PhasePipeline(folder, sequential, progress=False, log=lambda msg: None)
    other = pipe.with_profile(batched)
    assert other.profile == batched and pipe.profile == sequential and pipe.runtime.profile == sequential
    assert other.folder is pipe.folder and other.timings is pipe.timings and other.runtime is not pipe.runtime
    with pytest.raises(AttributeError):
        pipe.profile = batched
    forwards = {}
    for name, p in (("sequential", pipe), ("batch", other)):
        seen, load = forwards.setdefault(name, []), p.runtime.load

        def counting(component, dtype, load=load, seen=seen):
            model = load(component, dtype)
            if component == "transformer":
                model.register_forward_pre_hook(lambda *args: seen.append(1))
            return model
        p.runtime.load = counting
        p(prompt="a cat", num_frames=17, height=16, width=16, num_inference_steps=1, output_type="latent")
    assert (len(forwards["sequential"]), len(forwards["batch"])) == (2, 1)   # one DiT forward per CFG branch


def profile_assignments(source: str) -> list[int]:
    """Lines that set a `profile` attribute of another object (`pipe.profile = ...`, `pipe.runtime.profile = ...`);
    an object setting its own (`self.profile = ...`) is not one."""
    import ast
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Assign, ast.AugAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute) and target.attr == "profile"
            and not (isinstance(target.value, ast.Name) and target.value.id == "self")]


def test_no_job_or_face_sets_a_pipelines_profile():
    from pathlib import Path

    import lowvram_stepvideo
    root = Path(lowvram_stepvideo.__file__).parent
    found = [f"{path.relative_to(root)}:{line}" for sub in ("run", "face") for path in sorted((root / sub).glob("*.py"))
             for line in profile_assignments(path.read_text())]
    assert not found, "a pipeline's profile set from outside (use pipe.with_profile):\n" + "\n".join(found)
    planted = "pipe.profile = p\nself.profile = p\njob.pipe.runtime.profile = p\nprofile = p\n"
    assert profile_assignments(planted) == [1, 3]
