"""Checks before quantize.py writes anything: the source is a Step-Video folder, the output is elsewhere and not
there yet (or --force), and the disk has room."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import StepVideoError


DISK_MARGIN = 64 * 2**20


class QuantizeError(StepVideoError, ValueError):
    """A problem with the request or the folders; the message is one line and says what to do."""


def check_request(src: Path, dst: Path, force: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if not src_r.is_dir():
        raise QuantizeError(f"--model-dir {src}: folder not found")
    _check_step_video(src_r)
    if dst_r == src_r or src_r in dst_r.parents:
        raise QuantizeError(f"--out {dst} is inside --model-dir {src}; choose a folder outside the source")
    if dst_r in src_r.parents:
        raise QuantizeError(f"--model-dir {src} is inside --out {dst}; choose another --out")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise QuantizeError(f"--out {dst} already exists; pass --force to replace it, or choose another folder")


def _check_step_video(src: Path) -> None:
    hint = "pass the folder that holds model_index.json, transformer/ and step_llm/"
    try:
        index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise QuantizeError(f"{src} is not a Step-Video model folder (no readable model_index.json); {hint}") from None
    if not isinstance(index, dict) or index.get("_class_name") != "StepVideoPipeline":
        raise QuantizeError(f"{src} is not a Step-Video model folder (model_index.json is not a "
                            f"StepVideoPipeline); {hint}")


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(dst: Path, need: int) -> None:
    probe = existing_ancestor(dst)
    free = shutil.disk_usage(probe).free
    if free < need + DISK_MARGIN:
        raise QuantizeError(f"not enough disk space for {dst}: need {(need + DISK_MARGIN) / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB free on {probe}; free some space or choose another --out")
