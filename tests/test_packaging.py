"""A non-editable install (the wheel `pip install .` builds) finds its profiles from any folder and runs as
`python -m lowvram_stepvideo`."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "lowvram_stepvideo", "profiles")


def _install(tmp_path: Path) -> Path:
    """pip install --target of a clean copy of the project (building in the checkout would leave build/ there)."""
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", *isolation,
           "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return site


def _run(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOWVRAM_STEPVIDEO_PROFILES")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_installed_package_finds_its_profiles_from_any_folder(tmp_path):
    site = _install(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import lowvram_stepvideo.profiles as P; print(P.__file__); print(P.profiles_dir()); "
            "print(P.load_profile('24gb').path); print(','.join(P.list_profiles()))")
    proc = _run(site, elsewhere, sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    module, folder, loaded, names = proc.stdout.splitlines()
    assert Path(module).is_relative_to(site) and Path(loaded).is_relative_to(site)   # not the checkout's copy
    assert Path(folder) == site / "lowvram_stepvideo" / "profile_files"
    repo_profiles = sorted((ROOT / "profiles").glob("*.toml"))
    assert sorted(names.split(",")) == sorted(p.stem for p in repo_profiles)
    for p in repo_profiles:                                 # one source: the packaged files are the repo's files
        assert (Path(folder) / p.name).read_bytes() == p.read_bytes()

    proc = _run(site, elsewhere, sys.executable, "-m", "lowvram_stepvideo", "--list-profiles")
    assert proc.returncode == 0 and "24gb" in proc.stdout and "204x544x992@50" in proc.stdout, proc.stderr
    proc = _run(site, elsewhere, str(site / "bin" / "lowvram-stepvideo"), "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: lowvram-stepvideo"), proc.stderr

    shapes = sorted(f.relative_to(ROOT) for f in (ROOT / "lowvram_stepvideo" / "release_shapes").rglob("*")
                    if f.is_file())
    assert shapes and all((site / f).read_bytes() == (ROOT / f).read_bytes() for f in shapes), \
        "setup.cfg [options.package_data] must install every file of lowvram_stepvideo/release_shapes"

    packages = {p.parent.relative_to(ROOT) for p in (ROOT / "lowvram_stepvideo").rglob("__init__.py")}
    missing = [str(p) for p in packages if not (site / p / "__init__.py").is_file()]
    assert not missing, f"add these packages to setup.cfg [options] packages: {missing}"
