"""Names that say which cache they mean: --step-cache THRESHOLD (the DiT's first-block step cache) and
--no-text-cache (the text-embedding cache), in --help, the web page and the API's options. The old spellings
(--cache, --no-cache; the options cache and cache_dir) still work for one release, with one line naming the new
name; sidecars carry the old option keys beside the new ones, and old sidecars and job files still read."""
import json

import pytest

from cli_support import read_sidecar, run_cli
from lowvram_stepvideo.face import cli, job_queue, web_view
from lowvram_stepvideo.face.api import StepVideoPipeline
from lowvram_stepvideo.run.preflight import JobSpec

PROMPT = "a paper boat drifts down a gutter"   # used by no other test
TINY = ["--frames", "17", "--height", "16", "--width", "16", "--steps", "2"]


def test_help_names_the_new_flags_only(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "--step-cache THRESHOLD" in text and "--no-text-cache" in text
    assert "--cache" not in text.replace("--step-cache", "") and "--no-cache" not in text


@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_the_old_flags_still_work_and_say_the_new_names(tmp_path, capsys):
    runs = {}
    for name, flags in (("new", ["--step-cache", "0.5", "--no-text-cache"]),
                        ("old", ["--cache", "0.5", "--no-cache"])):
        out = tmp_path / f"{name}.mp4"
        rc, _, err = run_cli(capsys, "--demo", "--prompt", PROMPT, *TINY, *flags, "--output", out)
        assert rc == 0, err
        runs[name] = (err.splitlines(), read_sidecar(out))
    notes = [line for line in runs["old"][0] if line.startswith("note: ")]
    assert notes == ["note: --cache is now --step-cache (the old name goes in the next release)",
                     "note: --no-cache is now --no-text-cache (the old name goes in the next release)"]
    assert not any(line.startswith("note: ") for line in runs["new"][0])
    for _, meta in runs.values():
        arguments = meta["arguments"]
        assert arguments["step_cache"] == 0.5 and meta["speed"]["options"]["cache"] == 0.5
        assert arguments["text_cache"] is False and arguments["cache"] is False   # the old key, for old readers
        assert "text" in meta["timings_s"]                                          # no cache: encoded
    assert runs["new"][1]["speed"] == runs["old"][1]["speed"]                       # the same run


def test_old_flags_with_web_are_refused_like_the_new_ones(capsys):
    for flag in (["--no-text-cache"], ["--no-cache"], ["--step-cache", "0.1"], ["--cache", "0.1"]):
        rc = cli.main(["--web", "--demo", *flag])
        err = capsys.readouterr().err
        assert rc == 2 and "does not go with --web" in err, (flag, err)


def test_the_api_takes_the_old_option_names_and_says_the_new_ones(demo_env):
    said = []
    pipe = StepVideoPipeline(demo=True, log=said.append, cache=False, cache_dir="/tmp/x")
    assert pipe.base.options == {"text_cache": False, "text_cache_dir": "/tmp/x"}
    assert said == ["note: option 'cache' is now 'text_cache' (the old name is taken until the next release)",
                    "note: option 'cache_dir' is now 'text_cache_dir' (the old name is taken until the next release)"]


def test_job_files_and_sidecars_written_with_the_old_names_still_read(tmp_path):
    old = {"prompt": "p", "seed": 3, "output": str(tmp_path / "a.mp4"), "options": {"cache": False, "resume": "auto"}}
    spec = job_queue.spec_from_dict(json.loads(json.dumps(old)))
    assert spec.options == {"text_cache": False, "resume": "auto"}
    assert JobSpec("p", options={"cache_dir": "d"}).options == {"text_cache_dir": "d"}
    for arguments in ({"cache": False}, {"text_cache": False}, {"text_cache": False, "cache": False}):
        assert web_view.form_from_sidecar({"arguments": arguments}, [])["text_cache"] is False
    assert web_view.form_from_sidecar({"arguments": {}}, [])["text_cache"] is True
