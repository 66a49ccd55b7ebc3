"""The web page's logic without a browser: the model list, the form -> job conversion, the queue table, the
finished videos and "reuse these settings". The page in a real browser is tests/test_web.py."""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowvram_stepvideo.face import cli, web_catalog, web_view
from lowvram_stepvideo.defaults import DEMO_PRESET, WEB_PREVIEW_EVERY
from lowvram_stepvideo.run import preflight
from lowvram_stepvideo.profiles import load_profile
from lowvram_stepvideo.files.configs import ConfigError
from lowvram_stepvideo.loading.model_folder import ModelFolderError

from conftest import link_tree


@pytest.fixture
def no_config(monkeypatch, tmp_path):
    monkeypatch.delenv(web_catalog.CONFIG_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def write_config(monkeypatch, path: Path, text: str) -> Path:
    path.write_text(text)
    monkeypatch.setenv(web_catalog.CONFIG_ENV, str(path))
    return path


# ---- the model list ------------------------------------------------------------------------------------------------

def test_catalog_lists_command_line_then_config_then_demo(monkeypatch, tmp_path, demo_dir):
    other = link_tree(demo_dir, tmp_path / "models" / "second")
    write_config(monkeypatch, tmp_path / "web.toml", 'model_dirs = ["models/second", "/no/such/folder"]\n')
    warnings = []
    catalog = web_catalog.load_catalog(demo_dir, demo=True, warn=warnings.append)
    assert [c.path for c in catalog] == [demo_dir.resolve(), other.resolve(), None, None]
    assert [c.key for c in catalog] == ["0", "1", web_catalog.DEMO_KEY, web_catalog.TI2V_DEMO_KEY]
    assert [c.demo for c in catalog] == [False, False, True, "ti2v"] and [c.kind for c in catalog][-1] == "ti2v"
    assert len(warnings) == 1 and "/no/such/folder" in warnings[0] and "left out" in warnings[0]


def test_catalog_default_config_file_is_optional_and_read(no_config, tmp_path, demo_dir):
    assert [c.demo for c in web_catalog.load_catalog(None, demo=True, warn=print)] == [True, "ti2v"]
    config = tmp_path / "xdg" / "lowvram-stepvideo" / "web.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'model_dirs = ["{demo_dir}"]\n')
    assert [c.path for c in web_catalog.load_catalog(None, demo=False, warn=print)] == [demo_dir.resolve()]


def test_catalog_refuses_an_empty_list_and_a_bad_command_line_folder(no_config, tmp_path):
    with pytest.raises(ConfigError, match="--model-dir PATH or --demo"):
        web_catalog.load_catalog(None, demo=False, warn=print)
    with pytest.raises(ModelFolderError):
        web_catalog.load_catalog(tmp_path, demo=True, warn=print)


@pytest.mark.parametrize("text, message", [("model_dirs = [", "not a readable TOML"),
                                           ("models = []", "unknown key 'models'"),
                                           ("model_dirs = '/a'", "must be a list")])
def test_catalog_config_errors_are_one_line(monkeypatch, tmp_path, text, message):
    write_config(monkeypatch, tmp_path / "web.toml", text)
    with pytest.raises(ConfigError, match=message) as e:
        web_catalog.load_catalog(None, demo=True, warn=print)
    assert "\n" not in str(e.value)


def test_catalog_named_config_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(web_catalog.CONFIG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="not found"):
        web_catalog.load_catalog(None, demo=True, warn=print)


# ---- what the page shows -------------------------------------------------------------------------------------------

def status(job_id, state, prompt="a <b>cat</b>", **kw):
    base = dict(phase=None, done=0, total=None, elapsed_s=0.0, eta_s=None, output=None, error=None, preview=None)
    return SimpleNamespace(id=job_id, spec=SimpleNamespace(prompt=prompt), state=state, **{**base, **kw})


def test_duration():
    assert [web_view.duration(s) for s in (0, 7.4, 754, 3723)] == ["0:00", "0:07", "12:34", "1:02:03"]
    assert web_view.duration(None) == web_view.duration(float("nan")) == "\u2014"


def test_queue_html_newest_first_with_progress_and_escaped_text():
    page = web_view.queue_html([status("job-1", "done", output=Path("results/a.mp4")),
                                status("job-2", "running", phase="denoise", done=3, total=8, eta_s=65),
                                status("job-10", "failed", error="out of memory <here>")])
    rows = page.split("<tr class=")[1:]
    assert [r.split('data-job="')[1].split('"')[0] for r in rows] == ["job-10", "job-2", "job-1"]
    assert '<progress value="3" max="8"></progress> 3/8' in rows[1] and "1:05" in rows[1] and "denoise" in rows[1]
    assert "out of memory &lt;here&gt;" in rows[0] and "a.mp4" in rows[2]
    assert "<b>" not in page and "a &lt;b&gt;cat&lt;/b&gt;" in page
    assert "No jobs yet" in web_view.queue_html([])


def test_the_queue_shows_a_running_or_cancelled_jobs_latest_preview(page, tmp_path):
    preview = tmp_path / "a.mp4.preview.webp"
    preview.write_bytes(b"RIFF")
    record = {"path": str(preview), "step": 10, "frames": 3}
    running = status("job-1", "running", phase="denoise", done=10, total=50, preview=record)
    src = page.preview_src(running)
    assert src.startswith("/gradio_api/file=") and src.endswith("a.mp4.preview.webp?step=10")
    html = web_view.queue_html([running, status("job-2", "done", preview=record),
                                status("job-3", "cancelled", preview=record), status("job-4", "running")],
                               page.preview_src)
    rows = {r.split('data-job="')[1].split('"')[0]: r for r in html.split("<tr class=")[1:]}
    assert f'<img src="{src}" alt="preview after step 10"' in rows["job-1"] and src in rows["job-3"]
    assert "<img" not in rows["job-2"] and "<img" not in rows["job-4"]     # a done job has its video; none yet
    outside = tmp_path.parent / "elsewhere.webp"                            # the page serves only its folder
    assert page.preview_src(status("job-5", "running", preview={**record, "path": str(outside)})) is None
    preview.unlink()
    assert page.preview_src(running) is None and "<img" not in web_view.queue_html([running], page.preview_src)


def test_job_choices_label_state_and_prompt():
    assert web_view.job_choices([status("job-1", "cancelled", prompt="x " * 40)])[0][1] == "job-1"
    assert web_view.job_choices([status("job-1", "cancelled")])[0][0].startswith("#job-1 cancelled: a <b>")


def test_finished_videos_need_a_sidecar_and_skip_unfinished_writes(tmp_path):
    for name, sidecar in (("old.mp4", True), ("new.mp4", True), ("no-sidecar.mp4", False), (".new.mp4.tmp.mp4", True)):
        (tmp_path / name).write_bytes(b"x")
        if sidecar:
            (tmp_path / (name + ".json")).write_text("{}")
        time.sleep(0.01)
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "1-a.mp4").write_bytes(b"x")
    (tmp_path / "batch" / "1-a.mp4.json").write_text("{}")
    assert [p.name for p in web_view.finished_videos(tmp_path)] == ["1-a.mp4", "new.mp4", "old.mp4"]
    assert web_view.finished_videos(tmp_path / "missing") == []


def test_form_from_sidecar_maps_the_model_to_a_choice(tmp_path):
    catalog = [web_catalog.ModelChoice("0", "m", tmp_path), web_catalog.ModelChoice("demo", "d", None)]
    meta = {"prompt": "p", "negative_prompt": None, "seed": 7, "model_dir": str(tmp_path), "preset": "34x64x96",
            "steps": 4, "guidance_scale": 5.0, "shift": 3.0, "profile": {"name": "cpu"},
            "arguments": {"demo": False, "profile": "auto", "attention": "sdpa", "cache": False, "vae_tile": 2}}
    form = web_view.form_from_sidecar(meta, catalog)
    assert form == {"model": "0", "prompt": "p", "negative_prompt": "", "seed": 7, "profile": "auto",
                    "preset": "34x64x96", "steps": 4, "guidance_scale": 5.0, "shift": 3.0, "attention": "sdpa",
                    "text_cache": False, "resident_blocks": None, "vae_tile": 2, "matmul": "profile",
                    "step_cache": None, "compile": False, "motion_score": None}
    assert web_view.form_from_sidecar({**meta, "model_dir": "/elsewhere"}, catalog)["model"] is None
    assert web_view.form_from_sidecar({**meta, "arguments": {"demo": True}}, catalog)["model"] == "demo"
    assert web_view.form_from_sidecar({**meta, "arguments": {}}, catalog)["profile"] == "cpu"
    assert web_view.form_from_sidecar({"cfg": 9.0}, catalog)["guidance_scale"] == 9.0   # sidecars before the rename


def test_form_from_sidecar_restores_the_speed_levers(tmp_path):
    levers = lambda meta: {k: web_view.form_from_sidecar(meta, [])[k] for k in ("matmul", "step_cache", "compile")}
    asked = {"arguments": {"matmul": "fast", "step_cache": 0.1, "compile": True}}
    assert levers(asked) == {"matmul": "fast", "step_cache": 0.1, "compile": True}
    # a job without overrides: its arguments hold the run options' defaults (step cache 0.0 = off)
    assert levers({"arguments": {"step_cache": 0.0, "compile": False}}) == {"matmul": "profile", "step_cache": None,
                                                                            "compile": False}
    ran = {"speed": {"options": {"cache": 0.05, "cache_max_reuse": 2, "compile": True}}}   # "arguments" without them
    assert levers(ran) == {"matmul": "profile", "step_cache": 0.05, "compile": True}
    assert levers({}) == {"matmul": "profile", "step_cache": None, "compile": False}


def test_speed_line_from_the_sidecar():
    speed = {"attention": "sdpa", "matmul": "int8 x int8", "compile": False,
             "step_cache": {"threshold": 0.1, "full": 30, "cached": 10}}
    assert web_view.speed_line({"speed": speed}) == ("speed: attention sdpa; matmul int8 x int8; step cache 0.1 "
                                                     "(10 of 40 DiT forwards reused); compile off")
    off = web_view.speed_line({"speed": {**speed, "step_cache": None, "compile": True}})
    assert off.endswith("; step cache off; compile on")
    assert web_view.speed_line({}) == web_view.speed_line({"speed": None}) == ""


def test_read_sidecar_reports_a_broken_file(tmp_path):
    (tmp_path / "a.mp4.json").write_text("{")
    assert "cannot read a.mp4.json" in web_view.read_sidecar(tmp_path / "a.mp4")["error"]
    (tmp_path / "a.mp4.json").write_text(json.dumps({"seed": 1}))
    assert web_view.read_sidecar(tmp_path / "a.mp4") == {"seed": 1}


# ---- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [(["--demo", "--port", "8080", "--prompt", "x"], "go with --web"),
                                           (["--web", "--demo", "--prompt", "x"], "--prompt does not go with --web"),
                                           (["--web", "--demo", "--port", "0"], "--port 0: must be 1-65535")])
def test_web_flags_are_checked(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_web_without_a_model_is_a_one_line_error(capsys, no_config):
    assert cli.main(["--web"]) == 2
    err = capsys.readouterr().err.strip()
    assert "give --model-dir PATH or --demo" in err and err.count("\n") == 0


# ---- the page's actions (a real JobQueue; no job is run here: tests/test_web.py runs them in a browser) ---------

@pytest.fixture
def page(tmp_path, demo_dir):
    from lowvram_stepvideo.face.job_queue import JobQueue
    from lowvram_stepvideo.face.web_page import WebPage
    catalog = [web_catalog.ModelChoice("0", "demo folder", demo_dir), web_catalog.ModelChoice("demo", "demo", None)]
    queue = JobQueue(worker=lambda spec, events: None, results_dir=tmp_path)
    yield WebPage(catalog, queue, tmp_path)
    queue.close()


def form(**kw):
    from lowvram_stepvideo.face.web_page import Form
    return Form(**{"model": "demo", "prompt": "a fox", "preset": "34x64x96", **kw})


def test_spec_from_the_form(page, demo_dir):
    spec = page.spec(form(model="0", seed="12", steps=" 7 ", guidance_scale="4.5", shift="", attention="sdpa",
                          text_cache=False, resident_blocks="3", vae_tile="0", negative_prompt="  ", profile="cpu"))
    assert (spec.model_dir, spec.demo, spec.profile, spec.seed) == (demo_dir, False, "cpu", 12)
    assert (spec.frames, spec.height, spec.width, spec.steps, spec.guidance_scale, spec.shift) == (34, 64, 96, 7, 4.5,
                                                                                                  None)
    assert spec.negative_prompt is None
    assert spec.options == {"text_cache": False, "attention": "sdpa", "dit_resident_blocks": 3, "vae_tile": 0,
                            "preview": WEB_PREVIEW_EVERY}
    demo_spec = page.spec(form())
    assert demo_spec.demo and demo_spec.model_dir is None
    assert demo_spec.options == {"text_cache": True, "preview": WEB_PREVIEW_EVERY}


@pytest.mark.parametrize("kw, flags", [({"matmul": "fast"}, ["--matmul", "fast"]),
                                       ({"matmul": "weight-only"}, ["--matmul", "weight-only"]),
                                       ({"step_cache": " 0.1 "}, ["--step-cache", "0.1"]),
                                       ({"compile": True}, ["--compile"])])
def test_speed_levers_map_as_the_command_line_maps_them(page, kw, flags):
    spec = page.spec(form(**kw))
    wanted = cli.job_spec(cli.build_parser().parse_args(["--demo", "--prompt", "a fox", *flags])).options
    assert spec.options == {"text_cache": True, "preview": WEB_PREVIEW_EVERY,
                            **{k: wanted[k] for k in ("matmul", "step_cache", "compile") if k in wanted}}
    assert len(spec.options) == 3
    assert preflight.speed_options(spec) == preflight.speed_options(dataclasses.replace(spec, options=wanted))


def test_a_blank_or_zero_step_cache_is_off(page):
    for blank in (None, "", " ", "0"):
        spec = page.spec(form(step_cache=blank, matmul="profile", compile=False))
        assert spec.options == {"text_cache": True, "preview": WEB_PREVIEW_EVERY}
        assert preflight.speed_options(spec).cache == 0.0


@pytest.mark.parametrize("kw, message", [({"prompt": " "}, "the prompt is empty"),
                                         ({"model": "/etc"}, "unknown model choice"),
                                         ({"profile": "../x"}, "unknown profile"),
                                         ({"preset": "big"}, "expected FRAMESxHEIGHTxWIDTH"),
                                         ({"steps": "1.5"}, "steps 1.5: must be a whole number"),
                                         ({"shift": "abc"}, "shift 'abc': not a number"),
                                         ({"shift": "-1"}, "Shift -1.0: must be a positive"),
                                         ({"steps": "1000000000000"}, "Steps 1000000000000: needs at least 1 "
                                                                      "denoising step and at most 1000"),
                                         ({"step_cache": "fast"}, "step cache threshold 'fast': not a number"),
                                         ({"step_cache": "1.5"}, "cache threshold 1.5 must be a number in [0, 1)"),
                                         ({"step_cache": "-0.1"}, "cache threshold -0.1 must be a number in [0, 1)"),
                                         ({"matmul": "int4"}, "unknown matmul 'int4'; choose one of profile, "),
                                         ({"profile": "24gb"}, "needs a CUDA GPU and none was found; choose the cpu "
                                                               "profile (slow), or press Check fit to see")])
def test_form_errors_are_one_line_messages_in_the_pages_words(page, kw, message):
    if kw.get("profile") == "24gb" and torch.cuda.is_available():
        pytest.skip("this machine has the GPU that the 24gb profile needs")
    reply = page.submit(form(**kw))
    assert reply.startswith("**error:**") and message in reply and "\n" not in reply
    assert " --" not in reply, reply   # no command-line flag: the page's controls have other names
    assert page.queue.jobs() == []


def test_command_line_flags_become_the_names_of_the_pages_controls():
    from lowvram_stepvideo.face.web_view import in_page_words
    assert in_page_words("interrupted after step 3; saved to x (continue with --resume)") == \
        "interrupted after step 3; saved to x (continue with Resume)"
    assert in_page_words("profile 12gb would, at 68x544x992 (--profile 12gb)") == \
        "profile 12gb would, at 68x544x992 (the 12gb profile)"
    assert in_page_words("--vae-tile 0, --cache-dir, --no-cache") == "VAE tile 0, --cache-dir, the cached text embeddings box"


def test_the_demo_runs_with_the_cpu_profile_in_the_page_as_on_the_command_line(page):
    from_page = preflight.profile_for(page.spec(form(profile="auto")), need_device=False)
    from_cli = preflight.profile_for(cli.job_spec(cli.build_parser().parse_args(["--demo", "--prompt", "x"])))
    assert from_page.name == from_cli.name == "cpu"
    assert page.profile_note("auto", "demo").startswith("auto: cpu: the demo's tiny model")
    assert page.presets("demo", "auto") == page.presets("demo", "cpu")


def test_check_fit_plans_for_another_card_and_ram_size(page):
    report = page.check_fit(form(model="0", vram_gib="12", ram_gib="32"))
    assert "profile 12gb" in report and "12.0 GiB card" in report and "32.0 GiB RAM" in report, report
    assert "verdict: fits" in report and " --" not in report
    assert page.check_fit(form(model="0", profile="cpu", vram_gib="12")).startswith("VRAM does not apply")
    assert page.check_fit(form(model="0", vram_gib="lots")) == "error: VRAM (GiB) 'lots': not a number"
    assert page.check_fit(form(model="0", ram_gib="-4")).startswith("error: RAM (GiB) -4: give the memory in GiB")


def test_a_message_about_a_job_is_replaced_once_the_job_has_ended(page):
    assert page.submit(form()) == "queued job-1"
    assert page.queue.wait("job-1", 30).state == "done"
    assert page.status_line("queued job-1").startswith("job-1 is done")
    assert page.status_line("cancelling job-1: a running job stops after its current step").startswith("job-1 is done")
    assert page.status_line("settings of a.mp4 loaded") is None and page.status_line(None) is None


def test_cancel_and_resume_replies(page):
    assert "choose a job first" in page.cancel(None)
    assert "job-9 is unknown" in page.cancel("job-9")
    assert "choose a cancelled or failed job" in page.resume("")


def test_presets_and_profile_note(page):
    assert page.presets("demo", "cpu")[0] == DEMO_PRESET
    assert page.presets("0", "cpu") == list(load_profile("cpu").presets)
    assert page.profile_note("auto", "0").startswith("auto: ")
    assert page.profile_note("cpu") == load_profile("cpu").description
    assert page.matmul_choices("cpu") == [(f"profile ({load_profile('cpu').matmul})", "profile"),
                                          ("weight-only", "weight-only"), ("fast", "fast")]
    assert page.matmul_choices("../x")[0] == ("profile", "profile")
    assert page.check_fit(form(model="0", vae_tile="-")) == "error: VAE tile '-': not a number"


def test_only_finished_videos_of_the_results_folder_are_served(page, tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "a.mp4.json").write_text(json.dumps({"prompt": "p", "seed": 3, "arguments": {"demo": True}}))
    assert page.show("a.mp4") == (str(tmp_path / "a.mp4"), {"prompt": "p", "seed": 3, "arguments": {"demo": True}})
    assert page.show("../a.mp4") == (None, None) and page.show(None) == (None, None)
    assert page.video_choices() == [("p (seed 3)", "a.mp4")]
    (tmp_path / "a.mp4.json").write_text(json.dumps({"prompt": "q", "seed": 3, "arguments": {"demo": True}}))
    os.utime(tmp_path / "a.mp4", (1, 1))   # another version of the file: its caption is read again
    assert page.video_choices() == [("q (seed 3)", "a.mp4")]
    assert page.reuse("a.mp4")["model"] == "demo"
    (tmp_path / "a.mp4.json").write_text(json.dumps({"prompt": "q", "arguments": {
        "demo": True, "profile": "cpu", "matmul": "fast", "step_cache": 0.08, "compile": True}}))
    reused = page.reuse("a.mp4")
    assert (reused["matmul"], reused["step_cache"], reused["compile"]) == ("fast", 0.08, True)
    spec = page.spec(form(**{k: v for k, v in reused.items() if k != "preset"}))   # the form filled in again
    assert spec.options == {"text_cache": True, "preview": WEB_PREVIEW_EVERY, "matmul": "fast", "step_cache": 0.08,
                            "compile": True}
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "b.mp4").write_bytes(b"x")
    (tmp_path / "batch" / "b.mp4.json").write_text("{}")
    assert page.show("batch/b.mp4")[0] == str(tmp_path / "batch" / "b.mp4")
    with pytest.raises(ValueError, match="not a finished video"):
        page.reuse("/etc/passwd")


def test_missing_gradio_is_a_one_line_error(monkeypatch, capsys, no_config):
    monkeypatch.setitem(sys.modules, "gradio", None)   # import gradio raises ImportError
    assert cli.main(["--web", "--demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: the web page needs Gradio: pip install -e ".[web]" (from the repository root)'


def test_a_profile_file_given_on_the_command_line_is_offered(tmp_path, page):
    from lowvram_stepvideo.face.web_page import WebPage
    mine = tmp_path / "mine.toml"
    mine.write_text(Path(load_profile("cpu").path).read_text())
    offered = WebPage(page.catalog, page.queue, tmp_path, str(mine))
    assert offered.default_profile == str(mine) and offered.profiles[-1] == str(mine)
    assert offered.presets("0", str(mine)) == list(load_profile("cpu").presets)
    with pytest.raises(ConfigError):
        WebPage(page.catalog, page.queue, tmp_path, str(tmp_path / "missing.toml"))


def test_a_finished_job_is_neither_cancelled_nor_resumed(page):
    reply = page.submit(form())
    assert reply == "queued job-1"
    assert page.queue.wait("job-1", 30).state == "done"   # the fixture's worker does nothing
    assert "job-1 is done; only a queued or running job can be cancelled" in page.cancel("job-1")
    assert "only a cancelled or failed job can be resumed" in page.resume("job-1")


# ---- image to video ------------------------------------------------------------------------------------------------

@pytest.fixture
def ti2v_page(tmp_path, ti2v_demo_dir):
    from lowvram_stepvideo.face.job_queue import JobQueue
    from lowvram_stepvideo.face.web_page import WebPage
    catalog = [web_catalog.ModelChoice("0", "ti2v folder", ti2v_demo_dir, "ti2v"),
               web_catalog.ModelChoice("demo", "demo", None), web_catalog.ModelChoice("demo-ti2v", "d", None, "ti2v")]
    queue = JobQueue(worker=lambda spec, events: None, results_dir=tmp_path / "results")
    yield WebPage(catalog, queue, tmp_path / "results")
    queue.close()


def test_an_image_to_video_form_keeps_its_upload_and_motion_score(ti2v_page, tmp_path):
    from conftest import ti2v_fixture
    from lowvram_stepvideo.face.web_page import FIRST_IMAGES
    upload = tmp_path / "gradio-tmp" / "photo.PNG"
    upload.parent.mkdir()
    upload.write_bytes((ti2v_fixture() / "first_image.png").read_bytes())
    spec = ti2v_page.spec(form(model="0", image=str(upload), motion_score=8.5))
    kept = tmp_path / "results" / FIRST_IMAGES
    assert spec.image.parent == kept and spec.image.suffix == ".png" and spec.motion_score == 8.5
    assert spec.image.read_bytes() == upload.read_bytes()
    upload.unlink()                                       # Gradio's temporary upload may go away: the copy stays
    assert ti2v_page.spec(form(model="0", image=str(spec.image))).image == spec.image
    assert ti2v_page.spec(form(model="demo-ti2v", image=str(spec.image))).demo == "ti2v"
    assert ti2v_page.spec(form(model="demo", image=str(spec.image))).image is None   # text to video: no image
    assert ti2v_page.submit(form(model="0", image=str(spec.image))).startswith("queued")
    reply = ti2v_page.submit(form(model="0"))
    assert reply.startswith("**error:**") and "upload one" in reply
    reply = ti2v_page.submit(form(model="0", image=str(spec.image), motion_score="-2"))
    assert reply.startswith("**error:**") and "motion score -2" in reply
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert "not an image" in ti2v_page.submit(form(model="0", image=str(bad)))
    plan = ti2v_page.check_fit(form(model="0", profile="cpu"))            # the plan needs no image
    assert plan.startswith("memory plan") and "\nimage " in plan


def test_image_to_video_presets_are_capped_at_102_frames(ti2v_page):
    frames = [p.frames for p in ti2v_page.presets("0", "24gb")]
    assert max(frames) == 102 and len(frames) == len(set(ti2v_page.presets("0", "24gb")))
    assert ti2v_page.presets("demo-ti2v", "cpu")[0] == DEMO_PRESET


def test_reuse_restores_the_first_image_and_the_gallery_shows_only_kept_ones(ti2v_page, tmp_path):
    from lowvram_stepvideo.face.web_page import FIRST_IMAGES
    results = tmp_path / "results"
    kept = results / FIRST_IMAGES / "abc.png"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"png")
    outside = tmp_path / "private.png"
    outside.write_bytes(b"png")
    for name, image in (("a.mp4", kept), ("b.mp4", outside)):
        (results / name).write_bytes(b"x")
        (results / f"{name}.json").write_text(json.dumps(
            {"prompt": "p", "seed": 1, "kind": "ti2v", "image": str(image), "motion_score": 12.0,
             "arguments": {"demo": True}}))
    values = ti2v_page.reuse("a.mp4")
    assert values["model"] == "demo-ti2v" and values["image"] == str(kept) and values["motion_score"] == 12.0
    assert ti2v_page.reuse("b.mp4")["image"] is None
    assert ti2v_page.first_image(ti2v_page.show("a.mp4")[1]) == str(kept)
    assert ti2v_page.first_image(ti2v_page.show("b.mp4")[1]) is None
    assert "from an image" in dict((k, c) for c, k in ti2v_page.video_choices())["a.mp4"]
