#!/usr/bin/env python3
"""How fast one DiT block's bytes reach a host buffer, from each place BlockStreamer keeps streamed blocks.

    python tests/sparse_release.py /tmp/sparse --layers 4 --components transformer
    python bench/stream_cpu.py /tmp/sparse [--block 1] [--repeats 5] [--json out.json]

FOLDER is a release folder (its transformer/ is used) or a transformer folder; the DiT is loaded memory-mapped in
bf16 as a run does. For block `--block` (the others stay resident, i.e. untouched), it times filling one
slot-sized host buffer:
- disk:   positioned file reads (os.preadv) into the buffer, the source="disk" path; the first read comes after
          posix_fadvise(DONTNEED) on the weight files (cold page cache, where the kernel honours it), later reads
          are warm;
- mmap:   copies out of the memory-mapped tensors (the engine given no weight refs: how source="ram" beyond the
          packed budget reads a model it cannot find in the files; blocks it can find are read like disk);
- packed: copies out of the packed host image (source="ram" within budget; page-locked when CUDA exists).
Reports GB/s per path (median of the warm repeats) and prints a markdown table.

Caveat for sparse releases: their weight files are holes. Reading a hole costs no device I/O: the kernel hands out
zero-filled pages, so "disk" there measures the syscall and page-zeroing path, not an NVMe drive, and cold equals
warm. Real release files give real disk numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowvram_stepvideo.loading.loaders import load_dit  # noqa: E402
from lowvram_stepvideo.engines.streaming import BlockStreamer  # noqa: E402

GB = 1e9


def transformer_folder(folder: Path) -> Path:
    return folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder


def engine_for(model, block: int, source: str, budget: int, refs: bool = True) -> BlockStreamer:
    """A CPU streamer where only `block` is streamed (every other block stays as loaded)."""
    resident = [i for i in range(len(model.transformer_blocks)) if i != block]
    return BlockStreamer(model.transformer_blocks, "cpu", resident=resident, prefetch=0, source=source,
                         pin_budget_bytes=budget, weight_refs=model.weight_refs if refs else None,
                         prefix="transformer_blocks.").attach()


def drop_file_cache(model) -> None:
    for path in {ref.file for ref in model.weight_refs.values()}:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def time_reads(engine: BlockStreamer, block: int, repeats: int, before_first=None) -> tuple[float, list[float]]:
    """Seconds of the first fill and of `repeats` further fills of one slot-sized host buffer."""
    dst = torch.empty(engine.stats.slot_bytes, dtype=torch.uint8)
    dst.fill_(0)                                      # fault the buffer in: time the copies, not page faults
    times = []
    for i in range(repeats + 1):
        if i == 0 and before_first:
            before_first()
        start = time.perf_counter()
        engine.read_block_into(block, dst)
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def measure(model, block: int, repeats: int) -> list[dict]:
    rows = []
    for name, source, budget, cold in [("disk (preadv)", "disk", 0, lambda: drop_file_cache(model)),
                                       ("mmap (pageable)", "ram", 0, None),
                                       ("packed host RAM", "ram", 2**42, None)]:
        start = time.perf_counter()
        engine = engine_for(model, block, source, budget, refs=not name.startswith("mmap"))
        attach_s = time.perf_counter() - start
        first, warm = time_reads(engine, block, repeats, cold)
        nbytes = engine.stats.slot_bytes
        engine.detach()
        rows.append({"path": name, "block_gb": nbytes / GB, "attach_s": attach_s, "first_gbs": nbytes / first / GB,
                     "warm_gbs": nbytes / statistics.median(warm) / GB})
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| source | block GB | attach s | first read GB/s | warm GB/s (median) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['block_gb']:.3f} | {r['attach_s']:.2f} | {r['first_gbs']:.2f} | "
                     f"{r['warm_gbs']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="release folder or transformer folder")
    p.add_argument("--block", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    model = load_dit(transformer_folder(args.folder), torch.bfloat16)
    if not 0 <= args.block < len(model.transformer_blocks):
        raise SystemExit(f"--block {args.block}: the model has {len(model.transformer_blocks)} blocks")
    rows = measure(model, args.block, args.repeats)
    header = (f"one DiT block (dim {model.config.dim}, bf16) from {args.folder}, {os.cpu_count()} CPUs, "
              f"torch threads {torch.get_num_threads()}")
    print(markdown(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
