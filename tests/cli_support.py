"""Helpers shared by the tests that drive generate.py on the demo model (test_cli.py, test_runner.py)."""
import json
import os

import imageio.v2 as imageio
import numpy as np

from lowvram_stepvideo.face import cli
from lowvram_stepvideo.loading import demo
from lowvram_stepvideo.pipeline.machine import DeviceRuntime

BARS = ("step_llm:", "denoise:", "decode:")


def subprocess_env(demo_cache) -> dict:
    """Subprocess runs use the session's demo cache and one thread, so results compare across processes."""
    return {**os.environ, demo.CACHE_ENV: str(demo_cache), "OMP_NUM_THREADS": "1"}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr without progress bars) of one in-process generate.py run."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not _is_bar(ln)]
    return rc, out, "\n".join(lines)


def _is_bar(line: str) -> bool:
    """A progress line: tqdm's ('denoise:  50%|#####     | 2/4 [...]') or, off a terminal, a plain one
    ('denoise: 2/4 steps (50%), 0:01 elapsed, about 0:01 left')."""
    return line.startswith(BARS) and ("|" in line or "/s]" in line or " elapsed" in line)


def read_frames(path) -> np.ndarray:
    return np.stack(imageio.mimread(str(path), memtest=False))


def read_sidecar(path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))


def loads_of(monkeypatch) -> list[str]:
    """Names of the networks the pipeline loads from now on."""
    seen, original = [], DeviceRuntime.load

    def load(self, component, dtype):
        seen.append(component)
        return original(self, component, dtype)
    monkeypatch.setattr(DeviceRuntime, "load", load)
    return seen


def leftovers(folder, keep) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)
