#!/usr/bin/env python3
"""Time per guided denoising step for 1, 2, ... processes (CFG / sequence parallel,
lowvram_stepvideo/engines/parallel.py).

    python bench/parallel_scaling.py [--ranks 1 2 4] [--mode auto] [--layers 2 --heads 4 --latent 6x16x16]
    python bench/parallel_scaling.py --device cuda --ranks 1 2 4 8 --layers 4 --heads 48 --latent 36x34x62

For each rank count the script starts that many copies of itself with torchrun's environment (gloo on the CPU,
NCCL on CUDA: one GPU per rank). Every rank builds the same seeded random DiT of the given size (real block
layout, random weights), attaches the parallel engines, and runs warm-up steps then --steps timed steps of the
guided pair (one rank: the pair as a batch of 2). Rank 0 reports the median seconds per step; the table gives
the ratio to one rank measured in the same run. --json prints the rows as JSON.

CPU gloo timings on a small machine say nothing about GPU scaling: ranks share the same cores and memory
bandwidth, and gloo's all-to-all goes through TCP on loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowvram_stepvideo.engines import parallel  # noqa: E402
from lowvram_stepvideo.files.configs import DiTConfig  # noqa: E402
from lowvram_stepvideo.models.dit import StepVideoModel  # noqa: E402
from lowvram_stepvideo.pipeline.sampling import cfg_combine, dit_timestep, euler_step  # noqa: E402

TEXT_TOKENS, CLIP_TOKENS = 32, 8


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mode", choices=parallel.MODES, default="auto")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--latent", default="6x16x16", help="latent frames x height x width (tokens = the product)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def build(args, device: torch.device, dtype: torch.dtype) -> StepVideoModel:
    config = DiTConfig(num_layers=args.layers, num_heads=args.heads, in_channels=16, out_channels=16,
                       caption_channels=(256, 128))
    torch.manual_seed(0)   # the same weights on every rank
    model = StepVideoModel(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device, dtype).eval()


def worker(args) -> None:
    """One rank: time --steps guided steps; rank 0 prints {"seconds_per_step": ...}."""
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    par = parallel.init_from_env(args.mode, args.device) if world > 1 else None
    device = par.device if par else torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(args, device, dtype)
    if par:
        parallel.attach(model, par)
    t, h, w = (int(v) for v in args.latent.split("x"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, t, 16, h, w, generator=g).to(device)
    y = torch.randn(2, TEXT_TOKENS, 256, generator=g).to(device, dtype)
    clip = torch.randn(2, CLIP_TOKENS, 128, generator=g).to(device, dtype)
    times = []
    with torch.no_grad():
        for step in range(args.steps + 1):
            start = time.perf_counter()
            xb = x.to(dtype)
            v = model(torch.cat([xb, xb]), dit_timestep(torch.tensor(0.5), 2, dtype).to(device), y, clip, None)
            x = euler_step(x, cfg_combine(*v.chunk(2), 9.0), 0.5, 0.55)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
    if par is None or par.writer:
        print(json.dumps({"seconds_per_step": statistics.median(times)}), flush=True)
    parallel.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, ranks: int, argv: list[str]) -> float:
    port, procs = free_port(), []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(args.threads)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker"] + argv, env=env,
                                      stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{ranks} ranks failed (exit statuses {[p.returncode for p in procs]})")
    return json.loads(outs[0].strip().splitlines()[-1])["seconds_per_step"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    passed = [a for a in argv if a != "--json"]
    rows, base = [], None
    for ranks in args.ranks:
        try:
            layout = parallel.layout_for(args.mode, ranks).describe() if ranks > 1 else "1 process"
        except parallel.ParallelError as e:
            raise SystemExit(f"error: {e}") from None
        seconds = run_ranks(args, ranks, passed)
        base = base or (seconds if ranks == 1 else None)
        rows.append({"ranks": ranks, "layout": layout, "seconds_per_step": round(seconds, 4),
                     "speedup": round(base / seconds, 2) if base else None})
    t, h, w = (int(v) for v in args.latent.split("x"))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.device}, {args.layers} layers x {args.heads} heads, {t * h * w} tokens, guided pair, "
          f"{args.threads} thread(s) per rank")
    print("| ranks | layout | s / step | speedup vs 1 rank |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {r['layout']} | {r['seconds_per_step']:.3f} | {r['speedup'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
