"""Step-Video-TI2V through the runner on the tiny TI2V demo model: generate.py --image / --motion-score and their
one-line refusals, the sidecar, resume (the first image is part of the request), batches with an image per line,
the ladder's 102-frame cap, the memory plan's image phase, and the Python API's injection points."""
import json

import numpy as np
import pytest
import torch
from cli_support import loads_of, read_sidecar, run_cli
from conftest import ti2v_fixture
from PIL import Image
from safetensors.torch import load_file

from lowvram_stepvideo.errors import StepVideoError
from lowvram_stepvideo.face import api
from lowvram_stepvideo.files.images import file_sha256
from lowvram_stepvideo.pipeline.machine import DeviceRuntime
from lowvram_stepvideo.run.resume import checkpoint_path

FIRST = ti2v_fixture() / "first_image.png"      # 40x70: the crop is exercised
TINY = ["--frames", "17", "--height", "16", "--width", "32", "--steps", "2"]


@pytest.fixture
def other_image(tmp_path):
    path = tmp_path / "other.png"
    Image.fromarray(np.full((40, 70, 3), 120, np.uint8)).save(path)
    return path


def test_demo_with_an_image_makes_a_video_and_records_the_image(ti2v_demo_dir, tmp_path, capsys, monkeypatch):
    loads = loads_of(monkeypatch)
    out = tmp_path / "v.mp4"
    rc, _, err = run_cli(capsys, "--demo", "--image", FIRST, "--motion-score", "7.5", "--prompt", "a fox turns",
                         *TINY, "--output", out)
    assert rc == 0, err
    assert loads == ["step_llm", "hunyuan_clip", "vae_encoder", "transformer", "vae"]
    meta = read_sidecar(out)
    assert meta["kind"] == "ti2v" and meta["image"] == str(FIRST.resolve())
    assert meta["image_sha256"] == file_sha256(FIRST) == meta["request"]["image"]
    assert meta["motion_score"] == 7.5 == meta["request"]["motion_score"]
    assert "image" in meta["timings_s"] and meta["frames"] == 17


@pytest.mark.parametrize("case", ["t2v folder", "no image", "not an image", "small", "nan", "negative", "absurd"])
def test_bad_ti2v_input_is_one_line_exit_2_and_nothing_loaded(case, demo_dir, ti2v_demo_dir, tmp_path, capsys,
                                                              monkeypatch):
    loads = loads_of(monkeypatch)
    text, small = tmp_path / "notes.png", tmp_path / "small.png"
    text.write_text("hello")
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(small)
    folder, extra = ti2v_demo_dir, ["--image", FIRST]
    expected = {"t2v folder": "is a Step-Video-T2V folder", "no image": "give the first image with --image",
                "not an image": "not an image", "small": "too small", "nan": "must be a finite number",
                "negative": "must be from 0 to 100", "absurd": "must be from 0 to 100"}[case]
    if case == "t2v folder":
        folder = demo_dir
    elif case == "no image":
        extra = []
    elif case in ("not an image", "small"):
        extra = ["--image", text if case == "not an image" else small]
    else:
        extra += ["--motion-score", {"nan": "nan", "negative": "-1", "absurd": "1000"}[case]]
    rc, out, err = run_cli(capsys, "--model-dir", folder, "--profile", "cpu", "--prompt", "x", *extra, *TINY,
                           "--output", tmp_path / "v.mp4")
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert loads == [] and not (tmp_path / "v.mp4").exists()


def test_resume_refuses_another_image_and_continues_with_the_same(tmp_path, capsys, monkeypatch, other_image,
                                                                 ti2v_demo_dir):
    size = ["--demo", "--prompt", "a lantern floats", "--image", FIRST, "--frames", "17", "--height", "16",
            "--width", "32", "--steps", "3", "--checkpoint-every", "1"]
    ref, work = tmp_path / "ref", tmp_path / "work"
    ref.mkdir(), work.mkdir()
    assert run_cli(capsys, *size, "--output", ref / "v.mp4", "--save-latents", ref / "z.safetensors")[0] == 0
    state, original = {"forwards": 0, "armed": True}, DeviceRuntime.load

    def load(self, component, dtype):
        model = original(self, component, dtype)
        if component == "transformer":
            def hook(module, args):
                if state["armed"] and state["forwards"] == 2:   # sequential CFG: after step 1
                    raise KeyboardInterrupt
                state["forwards"] += 1
            model.register_forward_pre_hook(hook)
        return model
    monkeypatch.setattr(DeviceRuntime, "load", load)
    out = ["--output", work / "v.mp4", "--save-latents", work / "z.safetensors"]
    assert run_cli(capsys, *size, *out)[0] == 130
    ckpt = checkpoint_path(work / "v.mp4")
    saved = json.loads(load_file_meta(ckpt)["request"])
    assert saved["image"] == file_sha256(FIRST) and saved["motion_score"] == 5.0

    swapped = [a if a != FIRST else other_image for a in size]
    rc, _, err = run_cli(capsys, *swapped, "--resume", *out)
    assert rc == 2 and err == (f"error: {ckpt} was saved for different settings (image); use the same settings "
                               "or delete it to start fresh")
    rc, _, err = run_cli(capsys, *size, "--motion-score", "6", "--resume", *out)
    assert rc == 2 and "(motion_score)" in err

    state["armed"] = False
    rc, _, err = run_cli(capsys, *size, "--resume", *out)
    assert rc == 0, err
    assert torch.equal(load_file(str(work / "z.safetensors"))["latents"],
                       load_file(str(ref / "z.safetensors"))["latents"])   # the image latent is the seed's again


def load_file_meta(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_batch_lines_name_their_images(ti2v_demo_dir, tmp_path, capsys, other_image):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "imgs").mkdir()
    Image.open(FIRST).save(folder / "imgs" / "a b.png")
    prompts = folder / "list.txt"
    prompts.write_text('image="imgs/a b.png" a fox turns its head --seed 3\nthe lantern drifts\n', encoding="utf-8")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "--demo", "--image", other_image, "--prompts-file", prompts, "--output-dir", out,
                         *TINY)
    assert rc == 0, err
    videos = json.loads((out / "summary.json").read_text())["videos"]
    assert [v["state"] for v in videos] == ["done", "done"]
    assert [v["image"] for v in videos] == [str(folder / "imgs" / "a b.png"), None]
    sidecars = [read_sidecar(out / v["output"].split("/")[-1]) for v in videos]
    assert [s["image_sha256"] for s in sidecars] == [file_sha256(FIRST), file_sha256(other_image)]
    assert sidecars[0]["prompt"] == "a fox turns its head" and sidecars[0]["seed"] == 3


def test_dry_run_caps_the_ladder_at_102_frames_and_plans_the_image_phase(ti2v_demo_dir, capsys):
    args = ["--model-dir", ti2v_demo_dir, "--profile", "24gb", "--prompt", "x", "--dry-run", "--vram-gib", "24",
            "--ram-gib", "64", "--json"]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    verdict = json.loads(out)
    assert verdict["preset"].startswith("102x544x992")
    phases = verdict["phases"]
    assert list(phases) == ["text", "image", "denoise", "decode", "write"] and phases["image"]["peak_vram_bytes"] > 0
    rc, out, err = run_cli(capsys, *args, "--frames", "204")
    assert rc == 0 and json.loads(out)["preset"].startswith("204x544x992")
    assert "at most 102 frames" in err


# ---- the Python API ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ti2v_api(ti2v_demo_dir):
    return api.StepVideoPipeline.from_pretrained(ti2v_demo_dir, profile="cpu", cache=False, log=lambda m: None)


CALL = dict(num_frames=17, height=16, width=32, num_inference_steps=2, output_type="latent", seed=4)


def test_api_takes_an_image_as_path_pil_array_or_tensor(ti2v_api):
    assert ti2v_api.kind == "ti2v"
    want = ti2v_api("a fox turns", image=FIRST, **CALL)
    rgb = np.asarray(Image.open(FIRST).convert("RGB"))
    for given in (str(FIRST), Image.open(FIRST), rgb, torch.from_numpy(rgb).permute(2, 0, 1)):
        assert torch.equal(ti2v_api("a fox turns", image=given, **CALL), want)
    assert not torch.equal(ti2v_api("a fox turns", image=FIRST, motion_score=12.0, **CALL), want)


def test_api_injection_points_replace_their_phases(ti2v_api, monkeypatch):
    want = ti2v_api("a fox turns", image=FIRST, **CALL)
    embeds = ti2v_api.encode_prompt("a fox turns")
    image_latents = ti2v_api.encode_image(FIRST, 16, 32, seed=CALL["seed"])
    assert image_latents.shape == (1, 1, 4, 1, 2)
    noise = torch.randn((1, 3, 4, 1, 2), generator=torch.Generator().manual_seed(CALL["seed"]), dtype=torch.bfloat16)
    loads = loads_of(monkeypatch)
    got = ti2v_api(prompt_embeds=embeds, image_latents=image_latents, latents=noise, **CALL)
    assert loads == ["transformer"]          # no text phase, no image phase
    assert torch.equal(got, want)


def test_api_refuses_what_does_not_fit(ti2v_api, demo_dir):
    with pytest.raises(StepVideoError, match="give the first image"):
        ti2v_api("a fox", **CALL)
    with pytest.raises(StepVideoError, match="not both"):
        ti2v_api("a fox", image=FIRST, image_latents=torch.zeros(1, 1, 4, 1, 2), **CALL)
    with pytest.raises(StepVideoError, match="image_latents of shape"):
        ti2v_api("a fox", image_latents=torch.zeros(1, 1, 4, 2, 2), **CALL)
    with pytest.raises(StepVideoError, match="latents of shape"):
        ti2v_api("a fox", image=FIRST, latents=torch.zeros(1, 3, 4, 2, 2), **CALL)
    with pytest.raises(StepVideoError, match="prompt_embeds"):
        ti2v_api(prompt_embeds=(torch.zeros(2, 3, 5),), image=FIRST, **CALL)
    t2v = api.StepVideoPipeline.from_pretrained(demo_dir, profile="cpu", log=lambda m: None)
    with pytest.raises(StepVideoError, match="Step-Video-T2V folder"):
        t2v("a fox", image=FIRST, **CALL)


# ---- speed levers ----------------------------------------------------------------------------------------------

def test_step_cache_on_a_quantized_ti2v_folder(ti2v_demo_dir, tmp_path, capsys):
    from lowvram_stepvideo.tools.quantize_folder import quantize_folder
    quantize_folder(ti2v_demo_dir, tmp_path / "int8", "int8", log=lambda m: None)
    out = tmp_path / "q.mp4"
    rc, _, err = run_cli(capsys, "--model-dir", tmp_path / "int8", "--profile", "cpu", "--image", FIRST, "--prompt",
                         "a fox", "--frames", "17", "--height", "16", "--width", "32", "--steps", "5", "--cache", "0.9",
                         "--output", out)
    assert rc == 0, err
    meta = read_sidecar(out)
    assert meta["weight_format"] == "int8" and meta["kind"] == "ti2v"
    counts = meta["speed"]["step_cache"]
    assert counts["full"] + counts["cached"] == 2 * 5 and counts["cached"] > 0


@pytest.mark.slow
def test_fast_int8_matmul_and_compiled_blocks_on_the_ti2v_dit(ti2v_demo_dir, one_torch_thread):
    """The TI2V DiT (condition latents, motion score) with int8 weights, the fast int8 x int8 matmul (forced on
    the CPU) and its blocks compiled (aot_eager): one graph for every block and step, the same velocities."""
    from torch._dynamo.utils import counters

    from lowvram_stepvideo.engines import fast_matmul
    from lowvram_stepvideo.engines.compile import compile_blocks
    from lowvram_stepvideo.loading.loaders import load_dit
    from lowvram_stepvideo.models import quant
    model = load_dit(ti2v_demo_dir / "transformer", dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    quant.quantize_model(model, quant.FORMATS["int8"], quant.plan_quantization("transformer", names))
    calls = fast_matmul.attach_matmul(model, "int8", cuda=False).value
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 3, 4, 2, 3, generator=g), torch.zeros(1, 3, 4, 2, 3)
    cond[:, :1] = torch.randn(1, 1, 4, 2, 3, generator=g)
    text = (torch.randn(1, 5, 96, generator=g), torch.randn(1, 4, 32, generator=g), torch.ones(1, 9))

    def steps():
        with torch.no_grad():
            return [model(x, torch.tensor([t]), *text, cond, torch.tensor([5.0])) for t in (0.9, 0.5, 0.2)]
    eager = steps()
    torch._dynamo.reset()
    counters.clear()
    handle = compile_blocks(model.transformer_blocks, backend="aot_eager")
    try:
        compiled = steps()
    finally:
        handle.detach()
    assert calls[0] > 0 and counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_out_of_memory_steps_down_and_encodes_the_image_again_at_the_smaller_size(ti2v_demo_dir, monkeypatch):
    from lowvram_stepvideo.pipeline.machine import DeviceRuntime
    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    from lowvram_stepvideo.profiles import Preset
    big, small = Preset(34, 32, 48, 2), Preset(17, 16, 32, 2)
    encoded, original = [], PhasePipeline.denoise

    def denoise(self, embeds, latents, *args, **kwargs):
        if not isinstance(self.runtime, DeviceRuntime):   # the memory plan (keep warm) traces the same pipeline
            return original(self, embeds, latents, *args, **kwargs)
        encoded.append(tuple(args[4].shape))   # the condition latents it was handed
        if latents.shape[1] > 3:
            raise torch.OutOfMemoryError("injected")
        return original(self, embeds, latents, *args, **kwargs)
    monkeypatch.setattr(PhasePipeline, "denoise", denoise)
    said = []
    pipe = api.StepVideoPipeline.from_pretrained(ti2v_demo_dir, profile="cpu", presets=[big, small], log=said.append)
    latents = pipe("a fox turns", image=FIRST, num_frames=34, height=32, width=48, num_inference_steps=2,
                   output_type="latent")
    assert pipe.last_preset == small and latents.shape == (1, 3, 4, 1, 2)
    assert encoded == [(1, 6, 4, 2, 3), (1, 3, 4, 1, 2)]
    assert f"denoise: out of memory at {big}; memory freed, retrying at {small}" in said


def test_the_text_phase_uses_ti2v_magic_prompts_and_the_embedding_cache(ti2v_demo_dir, tmp_path, monkeypatch):
    from lowvram_stepvideo.pipeline.conditioning import MAGIC
    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    pipe = PhasePipeline.open(ti2v_demo_dir, profile="cpu", progress=False, log=lambda m: None)
    pipe.cache = pipe.embedding_cache(tmp_path / "embeddings")
    seen, original = [], PhasePipeline._run_step_llm
    monkeypatch.setattr(PhasePipeline, "_run_step_llm", lambda self, texts: seen.append(texts) or original(self, texts))
    first = pipe.encode_prompt("a fox turns")
    assert seen == [[["a fox turns" + MAGIC["ti2v"][0], MAGIC["ti2v"][1]]]]
    again = pipe.encode_prompt("a fox turns")
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))   # from the cache
