#!/usr/bin/env python3
"""Peak memory, throughput and output size of quantize.py on a full-width DiT slice; full-size ratios.

    python bench/quantize_memory.py [--layers 4] [--formats int8,fp8] [--workdir /tmp]

Builds a zero-weight release folder with tests/sparse_release.py (the DiT's top-level tensors plus
`--layers` full-width blocks, sparse files: about 5.5 GB apparent for 4 layers, no disk used), quantizes it in a
child process per format (after reading the source once, so every format meets the same page cache), and
reports the child's peak RSS (from wait4, cross-checked with RUSAGE_CHILDREN), its throughput and the
output/input size ratio. Then computes from release/state_dict_manifest.json what the full
DiT and step_llm folders weigh after quantization, against half their bf16 size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "data" / "release" / "state_dict_manifest.json"
RSS_LIMIT_MB = 2000


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def warm_page_cache(folder: Path) -> None:
    """Read the source once so every format meets the same page cache (reading zero holes is slow here)."""
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def run_child(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run `cmd`; return (exit code, wall seconds, peak RSS in MB of that child, its stdout)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return child.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024, out


def bench_format(src: Path, work: Path, fmt: str) -> dict:
    dst = work / f"out-{fmt}"
    cmd = [sys.executable, str(ROOT / "quantize.py"), "--model-dir", str(src), "--out", str(dst), "--format", fmt,
           "--components", "transformer"]
    code, seconds, rss_mb, out = run_child(cmd)
    if code != 0:
        raise SystemExit(f"quantize.py failed with exit code {code}")
    in_bytes, out_bytes = weight_bytes(src / "transformer"), weight_bytes(dst / "transformer")
    shutil.rmtree(dst)
    return {"format": fmt, "peak_rss_mb": rss_mb, "seconds": seconds, "mb_per_s": in_bytes / seconds / 1e6,
            "input_gb": in_bytes / 1e9, "output_gb": out_bytes / 1e9, "ratio": out_bytes / in_bytes,
            "quantize_py_says": out.strip().splitlines()[0] if out.strip() else ""}


def full_size_ratio(component: str) -> dict:
    """Output bytes of the full released component after quantization (tensor data; headers add < 1 MB)."""
    sys.path.insert(0, str(ROOT))
    from lowvram_stepvideo.models import quant
    entries = json.loads(MANIFEST.read_text())[component]["keys"]
    shapes = {e["key"]: e["shape"] for e in entries}
    plan = quant.plan_quantization(component, shapes)
    bf16 = sum(2 * math.prod(s) for s in shapes.values())
    out = sum((math.prod(s) + 4 * s[0]) if k in plan else 2 * math.prod(s) for k, s in shapes.items())
    kept = sum(math.prod(s) for k, s in shapes.items() if k not in plan)
    return {"component": component, "bf16_gb": bf16 / 1e9, "quantized_gb": out / 1e9, "ratio": out / bf16,
            "quantized_tensors": len(plan), "kept_tensors": len(shapes) - len(plan), "kept_params_m": kept / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--formats", default="int8,fp8")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quantize-bench-", dir=args.workdir))
    try:
        src = work / "release"
        subprocess.run([sys.executable, str(ROOT / "tests" / "sparse_release.py"), str(src), "--layers",
                        str(args.layers), "--components", "transformer"], check=True, stdout=subprocess.DEVNULL)
        warm_page_cache(src)
        rows = [bench_format(src, work, fmt) for fmt in args.formats.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for r in rows:
        ok = r["peak_rss_mb"] < RSS_LIMIT_MB and abs(r["ratio"] - 0.5) <= 0.005
        print(f"DiT {args.layers}-layer slice, {r['format']}: peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"{r['input_gb']:.2f} GB -> {r['output_gb']:.2f} GB (ratio {r['ratio']:.4f}), {r['seconds']:.1f} s, "
              f"{r['mb_per_s']:.0f} MB/s of bf16 input (child wall time) [{'ok' if ok else 'FAIL'}]")
        print(f"  quantize.py: {r['quantize_py_says']}")
    print(f"max RSS over all children (RUSAGE_CHILDREN, includes the sparse-folder writer): {children_mb:.0f} MB")
    for comp in ("transformer", "step_llm"):
        r = full_size_ratio(comp)
        print(f"full {comp}: {r['bf16_gb']:.3f} GB bf16 -> {r['quantized_gb']:.3f} GB (ratio {r['ratio']:.4f}, "
              f"{100 * (r['ratio'] / 0.5 - 1):+.2f}% vs half); {r['quantized_tensors']} tensors quantized, "
              f"{r['kept_tensors']} kept ({r['kept_params_m']:.1f} M params)")


if __name__ == "__main__":
    main()
