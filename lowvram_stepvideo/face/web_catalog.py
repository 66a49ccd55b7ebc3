"""The model folders the web page offers: the browser picks one of these by key and never sends a path.

The list is, in this order: `--model-dir` given on the command line, the folders listed in the web config file,
and the built-in demo models (text to video, image to video) when `--demo` is given. The config file is TOML:

    # ~/.config/lowvram-stepvideo/web.toml
    model_dirs = ["/models/stepvideo-t2v-int8", "~/models/stepvideo-t2v-turbo-int8"]

It is read from $LOWVRAM_STEPVIDEO_WEB_CONFIG when set, else from $XDG_CONFIG_HOME/lowvram-stepvideo/web.toml
(XDG_CONFIG_HOME defaults to ~/.config); a missing default file is fine. Relative entries are relative to the
file's folder. A listed folder that is not a model folder (a drive not mounted, a typo) is left out with a
warning, so one bad line does not keep the page from starting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files.configs import ConfigError
from ..loading.model_folder import ModelFolderError, open_model_folder
from ..profiles import tomllib

CONFIG_ENV = "LOWVRAM_STEPVIDEO_WEB_CONFIG"
DEMO_KEY = "demo"
TI2V_DEMO_KEY = "demo-ti2v"


@dataclass(frozen=True)
class ModelChoice:
    key: str            # what the page sends back
    label: str          # what the page shows
    path: Path | None   # None for a demo model (built on first use)
    kind: str = "t2v"   # "ti2v": image to video (the page asks for a first image and a motion score)

    @property
    def demo(self) -> bool | str:
        """False for a folder; for a demo model, what JobSpec.demo takes (True: T2V, "ti2v")."""
        return self.path is None and (self.kind if self.kind == "ti2v" else True)


def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "lowvram-stepvideo" / "web.toml"


def configured_dirs(path: Path, explicit: bool) -> list[Path]:
    """The model_dirs of the config file; [] when the default file does not exist."""
    if not path.is_file():
        if explicit:
            raise ConfigError(f"{path}: web config file not found (unset {CONFIG_ENV} or create the file)")
        return []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML file ({e}); fix it or move it away") from None
    unknown = sorted(set(raw) - {"model_dirs"})
    dirs = raw.get("model_dirs", [])
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the file has one key, model_dirs = [\"/path\", ...]")
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        raise ConfigError(f"{path}: model_dirs must be a list of folder names, e.g. model_dirs = [\"/models/a\"]")
    return [(path.parent / Path(d).expanduser()).resolve() for d in dirs]


def load_catalog(model_dir: Path | None, demo: bool, warn: Callable[[str], None]) -> list[ModelChoice]:
    """The page's model list; ConfigError when it would be empty or --model-dir is not a model folder."""
    path = config_path()
    choices: list[ModelChoice] = []
    if model_dir is not None:
        kind = open_model_folder(model_dir).kind   # a folder typed on the command line must be right
        choices.append(_choice(len(choices), Path(model_dir).resolve(), kind))
    for folder in configured_dirs(path, explicit=bool(os.environ.get(CONFIG_ENV))):
        if any(c.path == folder for c in choices):
            continue
        try:
            kind = open_model_folder(folder).kind
        except (ModelFolderError, ConfigError, OSError) as e:
            warn(f"warning: {path}: {folder} left out of the model list ({e})")
            continue
        choices.append(_choice(len(choices), folder, kind))
    if demo:
        choices.append(ModelChoice(DEMO_KEY, "demo: tiny random model (CPU, colourful noise)", None))
        choices.append(ModelChoice(TI2V_DEMO_KEY, "demo, image to video: tiny random TI2V model (CPU)", None,
                                   "ti2v"))
    if not choices:
        raise ConfigError(f"no model folder to offer: give --model-dir PATH or --demo, or list folders in {path} "
                          "(model_dirs = [\"/path/to/stepvideo-t2v-int8\"])")
    return choices


def _choice(index: int, folder: Path, kind: str) -> ModelChoice:
    what = "  [image to video]" if kind == "ti2v" else ""
    return ModelChoice(str(index), f"{folder.name}  ({folder}){what}", folder, kind)
