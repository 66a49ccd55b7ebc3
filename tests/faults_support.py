"""Helpers of the fault suite (test_faults_*.py): a writable copy of the demo model, tampered files, one run."""
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli_support import run_cli
from conftest import link_tree

PROMPT = "a red fox runs through fresh snow"
TINY = ["--frames", "17", "--height", "16", "--width", "16", "--steps", "2"]   # 3 latents of 1x1
DIT = "transformer/diffusion_pytorch_model.safetensors"


def model_copy(demo_dir: Path, where: Path) -> Path:
    """The demo model as hard links: replace a file (replace_file) to change it, never write into it."""
    return link_tree(demo_dir, where)


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def replace_file(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a new safetensors file at `path` (a new inode: the hard-linked original stays intact)."""
    path.unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def replace_json(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    path.unlink()
    path.write_text(json.dumps(change(raw)))


def run_ok(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    return err


def run_error(capsys, *argv) -> str:
    """The single 'error: ...' line of a run that must fail with exit code 2 and print nothing on stdout."""
    rc, out, err = run_cli(capsys, *argv)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and out == "" and len(errors) == 1 and "Traceback" not in err, (rc, err)
    return errors[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def copy_file(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
