#!/usr/bin/env python3
"""Load time and peak memory of each released network at full size, on a zero-weight sparse release.

    python bench/load_full_size.py [FOLDER]

FOLDER (default /tmp/lowvram_stepvideo_sparse_release) is reused when it already holds a model folder, otherwise
written with tests/sparse_release.py (~100 GB apparent size, a few MB on disk). Each component is
loaded with the normal loaders in a fresh subprocess, so every row's peak RSS is that load alone (plus the Python +
torch baseline, shown separately). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_SPARSE = ROOT / "tests" / "sparse_release.py"
DEFAULT_FOLDER = Path("/tmp/lowvram_stepvideo_sparse_release")
# (row label, component folder, load dtype); the pipeline runs the CLIP in float32, so both are shown
RUNS = [("transformer", "transformer", "bfloat16"), ("step_llm", "step_llm", "bfloat16"),
        ("hunyuan_clip", "hunyuan_clip", "bfloat16"), ("hunyuan_clip", "hunyuan_clip", "float32"),
        ("vae", "vae", "bfloat16")]
GIB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def child_load(component: str, root: Path, dtype_name: str) -> dict:
    import torch
    from lowvram_stepvideo.loading.loaders import load_clip, load_dit, load_step_llm, load_vae
    loaders = {"transformer": load_dit, "step_llm": load_step_llm, "hunyuan_clip": load_clip, "vae": load_vae}
    baseline = peak_rss()
    t0 = time.perf_counter()
    model = loaders[component](root / component, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - t0
    state = model.state_dict()
    files = {ref.file for ref in model.weight_refs.values()}
    return {"seconds": seconds, "peak_rss": peak_rss(), "baseline_rss": baseline, "tensors": len(state),
            "params": sum(t.numel() for t in state.values()), "files": len(files),
            "file_bytes": sum(f.stat().st_size for f in files)}


def child_validate(root: Path) -> dict:
    from lowvram_stepvideo.loading.model_folder import open_model_folder
    baseline = peak_rss()
    t0 = time.perf_counter()
    open_model_folder(root)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss(), "baseline_rss": baseline}


def in_subprocess(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_use(root: Path) -> tuple[int, int]:
    files = [f for f in root.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)


def ensure_release(root: Path) -> None:
    if (root / "model_index.json").is_file() and (root / "transformer").is_dir():
        print(f"reusing {root}")
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root.parent).free
    if free < 200 * 2**20:
        raise SystemExit(f"only {free / 2**20:.0f} MiB free under {root.parent}; the headers need a few MB")
    subprocess.run([sys.executable, str(MAKE_SPARSE), str(root)], check=True)
    apparent, used = disk_use(root)
    if used > 2**30:  # the file system wrote the zeros out instead of leaving holes
        raise SystemExit(f"{root}: {used / GIB:.1f} GiB really used of {apparent / GIB:.1f} GiB: no sparse files "
                         "here; pass a folder on a file system with sparse files (ext4, xfs, btrfs, tmpfs)")


def table(root: Path) -> str:
    rows = ["| component | load dtype | files | tensors | params | file size (apparent) | load s | peak RSS GiB "
            "| over baseline GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, component, dtype in RUNS:
        r = in_subprocess("load", component, str(root), dtype)
        rows.append(f"| {label} | {dtype} | {r['files']} | {r['tensors']} | {r['params'] / 1e9:.3f} B "
                    f"| {r['file_bytes'] / 1e9:.1f} GB | {r['seconds']:.2f} | {r['peak_rss'] / GIB:.2f} "
                    f"| {(r['peak_rss'] - r['baseline_rss']) / GIB:.2f} |")
    v = in_subprocess("validate", str(root))
    rows.append(f"| open_model_folder (validation) | - | - | - | - | - | {v['seconds']:.2f} "
                f"| {v['peak_rss'] / GIB:.2f} | {(v['peak_rss'] - v['baseline_rss']) / GIB:.2f} |")
    return "\n".join(rows)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, str(ROOT))
        mode, *rest = sys.argv[2:]
        result = child_load(rest[0], Path(rest[1]), rest[2]) if mode == "load" else child_validate(Path(rest[0]))
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, nargs="?", default=DEFAULT_FOLDER)
    root = ap.parse_args().folder.resolve()
    ensure_release(root)
    apparent, used = disk_use(root)
    print(f"{root}: {apparent / 1e9:.1f} GB apparent, {used / 1e6:.1f} MB on disk\n")
    print(table(root))


if __name__ == "__main__":
    main()
