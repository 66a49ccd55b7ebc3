#!/usr/bin/env python3
"""What previews cost: fitting the latent-to-RGB map, and one preview against one denoising step.

    python bench/preview_cost.py [--parts fit,preview,step,demo] [--threads 2] [--json]

- fit: the map of the release VAE (z 64, encoder ch 32 ch_mult (4,8,16,16)) at full size, its weights zeros that
  take no disk (tests/sparse_release.py; a zero weight costs the same time as a trained one), fitted the way a run
  does on first use (preview_map.load_fit_vae + fit_preview_map, default recipe), in a fresh process with
  `--threads` torch threads: seconds (loading and fitting) and the process's peak RSS, in float32 and in bf16
  (a run fits in bf16 where the CPU computes it natively, AVX512-BF16 or AMX, else in float32: fit_dtype).
- preview: one preview at full length, latents (1, 36, 64, 34, 62) (204 frames of 544x992): the frames
  (predicted clean latents, map, upsample to 140x256, the copy to the host) and the animated WebP written, median
  of `--repeats`, on the CPU (and on CUDA when there is one; the copy is then the preview's one sync).
- step: one denoising step at full length, 48 full-width DiT blocks (bf16 weights, random) on the batch of two
  (CFG). On CUDA one block is timed at the full 75,888 tokens; on the CPU, where that takes hours, one block is
  timed at two smaller token counts and t(T) = a T + b T^2 through them is extrapolated to 75,888 (labelled as
  such). The preview/step ratio is printed.
- demo: the built-in demo model (generate.py --demo, CPU, its preset): the map fitted on its decoder (it has no
  encoder), then its denoise timed per step without previews and with a preview after every step (through the
  run's hook, PhasePipeline.preview), the two videos compared bit for bit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from lowvram_stepvideo.files.preview_file import write_preview  # noqa: E402
from lowvram_stepvideo.pipeline.preview import Previewer, frame_durations, preview_frames  # noqa: E402
from lowvram_stepvideo.pipeline.preview_map import PreviewMap, fit_preview_map, load_fit_vae  # noqa: E402

FULL_LATENTS = (1, 36, 64, 34, 62)
FULL_TOKENS = 36 * 34 * 62
CPU_GRIDS = ((1, 16, 64), (4, 16, 64))          # 1,024 and 4,096 tokens
DIT_LAYERS, HEADS = 48, 48


def fit_in_child(vae_folder: Path, dtype: str, threads: int) -> dict:
    """The fit in a fresh process: its seconds (load and fit) and peak RSS."""
    code = "\n".join([
        f"import sys, time, resource, json, torch; sys.path.insert(0, {str(ROOT)!r}); torch.set_num_threads({threads})",
        "from lowvram_stepvideo.pipeline.preview_map import load_fit_vae, fit_preview_map",
        f"t = time.perf_counter(); vae = load_fit_vae({str(vae_folder)!r}, torch.{dtype})",
        "load = time.perf_counter() - t; m = fit_preview_map(vae)",
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20",
        "print(json.dumps({'load_s': round(load, 2), 'peak_rss_gib': round(rss, 2), **m.info}))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_fit(threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "tests" / "sparse_release.py"), tmp, "--components", "vae"],
                       check=True, capture_output=True)
        for dtype in ("float32", "bfloat16"):
            r = fit_in_child(Path(tmp) / "vae", dtype, threads)
            rows.append({"part": "fit", "what": f"release VAE (zero weights), {dtype}, {threads} threads",
                         "seconds": r["seconds"] + r["load_s"], "peak_rss_gib": r["peak_rss_gib"],
                         "pairs": r["pairs"], "images": r["images"], "image_size": r["image_size"]})
    return rows


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def full_latents(kind: str, g: torch.Generator) -> torch.Tensor:
    """Latents of the full-length shape: white noise (the WebP encoder's worst case) or smooth fields (random
    values on a 9 x 16 grid, upsampled: the look of a prediction, whose colours vary over several patches)."""
    if kind == "noise":
        return torch.randn(FULL_LATENTS, generator=g)
    b, f, c, h, w = FULL_LATENTS
    coarse = torch.randn(b * f, c, 9, 16, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").view(FULL_LATENTS)


def measure_preview(device: torch.device, repeats: int, out_dir: Path) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    pmap = PreviewMap(torch.randn(3, 64, generator=g) * 0.15, torch.zeros(3))
    path = out_dir / "bench.mp4.preview.webp"
    rows = []
    for kind in ("smooth", "noise"):
        latents = full_latents(kind, g).to(device)
        velocity = torch.zeros(FULL_LATENTS, dtype=torch.bfloat16, device=device)   # the loop's guided velocity
        frames = preview_frames(latents, velocity, 0.5, pmap)                       # warm-up
        durations = frame_durations(frames.shape[0])
        make = timed(lambda: preview_frames(latents, velocity, 0.5, pmap), repeats, device)
        write = timed(lambda: write_preview(path, frames, durations), repeats, torch.device("cpu"))
        size = path.stat().st_size
        rows += [{"part": "preview", "what": f"{kind} latents: frames {tuple(frames.shape)} from {FULL_LATENTS}",
                  "device": device.type, "seconds": make},
                 {"part": "preview", "what": f"{kind} latents: write WebP ({size / 1024:.0f} KiB)", "device": "cpu",
                  "seconds": write},
                 {"part": "preview", "what": f"{kind} latents: preview total", "device": device.type,
                  "seconds": make + write}]
    return rows


def block_seconds(grid: tuple[int, int, int], device: torch.device, repeats: int, stack) -> float:
    from stream_gpu import make_inputs, time_forward
    inputs = make_inputs(grid, 2, HEADS * 128, device)
    time_forward(stack, inputs, 1, device)                                     # warm-up
    return time_forward(stack, inputs, repeats, device)


def measure_step(device: torch.device, repeats: int) -> list[dict]:
    from stream_gpu import build_stack
    stack = build_stack(HEADS, 1, "bf16").to(device)
    if device.type == "cuda":
        t = block_seconds((36, 34, 62), device, repeats, stack)
        return [{"part": "step", "what": "full-length step (48 blocks x one measured block, CFG batch 2)",
                 "device": device.type, "seconds": DIT_LAYERS * t, "extrapolated": False}]
    rows, points = [], []
    for grid in CPU_GRIDS:
        t = block_seconds(grid, device, repeats, stack)
        tokens = grid[0] * grid[1] * grid[2]
        points.append((tokens, t))
        rows.append({"part": "step", "what": f"one block, CFG batch 2, {tokens} tokens", "device": "cpu",
                     "seconds": t, "extrapolated": False})
    (t1, s1), (t2, s2) = points
    b = (s2 / t2 - s1 / t1) / (t2 - t1)
    a = s1 / t1 - b * t1
    full = DIT_LAYERS * (a * FULL_TOKENS + b * FULL_TOKENS ** 2)
    rows.append({"part": "step", "what": f"full-length step, 48 blocks, {FULL_TOKENS} tokens, EXTRAPOLATED from "
                 f"t(T) = a T + b T^2 (a {a:.3g} s, b {b:.3g} s)", "device": "cpu", "seconds": full,
                 "extrapolated": True})
    return rows


def measure_demo(out_dir: Path) -> list[dict]:
    from lowvram_stepvideo.defaults import DEMO_PRESET
    from lowvram_stepvideo.loading.demo import build_demo_model
    from lowvram_stepvideo.pipeline.phases import PhasePipeline
    folder = build_demo_model()
    start = time.perf_counter()
    pmap = fit_preview_map(load_fit_vae(folder / "vae"))
    fit_s = time.perf_counter() - start
    pipe = PhasePipeline.open(folder, profile="cpu", progress=False)
    p = DEMO_PRESET
    embeds = pipe.encode_prompt("a cat playing piano")
    kwargs = dict(prompt_embeds=embeds, num_frames=p.frames, height=p.height, width=p.width,
                  num_inference_steps=p.steps, seed=1, output_type="uint8")

    stamps = []
    pipe(step_callback=lambda done, latents: stamps.append(time.perf_counter()), **kwargs)   # warm-up
    stamps.clear()
    plain = pipe(step_callback=lambda done, latents: stamps.append(time.perf_counter()), **kwargs)
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))   # between step ends: no set-up

    previewer = Previewer(out_dir / "demo.mp4.preview.webp", pmap, every=1, steps=p.steps)
    pipe.preview = previewer.step           # the run's hook: the step's latents and guided velocity
    stamps.clear()
    with_previews = pipe(step_callback=lambda done, latents: stamps.append(time.perf_counter()), **kwargs)
    pipe.preview = None
    step_with_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    preview_s = statistics.median(r["seconds"] for r in previewer.records)
    same = bool((plain == with_previews).all())
    return [{"part": "demo", "what": f"map fit on the demo decoder ({pmap.info['method']})", "seconds": fit_s},
            {"part": "demo", "what": f"denoising step, {p.frames} frames {p.height}x{p.width}", "seconds": step_s},
            {"part": "demo", "what": "denoising step with a preview after it", "seconds": step_with_s},
            {"part": "demo", "what": f"preview after every step, {previewer.records[-1]['frames']} frames "
             f"{previewer.records[-1]['height']}x{previewer.records[-1]['width']}; video bit-identical: {same}",
             "seconds": preview_s, "ratio_to_step": preview_s / step_s}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="fit,preview,step,demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        if "fit" in parts:
            rows += measure_fit(args.threads)
        for device in devices:
            if "preview" in parts:
                rows += measure_preview(device, args.repeats, Path(tmp))
            if "step" in parts:
                rows += measure_step(device, args.repeats)
            if {"preview", "step"} <= parts:
                total = max(r["seconds"] for r in rows if r["what"].endswith("preview total")
                            and r["device"] == device.type)
                step = rows[-1]["seconds"]
                rows.append({"part": "ratio", "what": "slowest preview / full-length step"
                             + (" (step extrapolated)" if rows[-1]["extrapolated"] else ""),
                             "device": device.type, "ratio": total / step})
        if "demo" in parts:
            rows += measure_demo(Path(tmp))
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    if args.json:
        print(json.dumps({"threads": args.threads, "load_average": load, "rows": rows}, indent=1))
    else:
        print(f"torch threads {args.threads}, load average at the end {load}")
        for r in rows:
            value = f"{r['ratio']:.3g}" if "ratio" in r and "seconds" not in r else f"{r['seconds']:.4g} s"
            extra = "".join(f", {k} {r[k]}" for k in ("peak_rss_gib", "pairs", "ratio_to_step") if k in r)
            print(f"{r['part']:8} {r.get('device', 'cpu'):5} {value:>12}  {r['what']}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
