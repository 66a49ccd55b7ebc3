#!/usr/bin/env python3
"""Speed levers measured in one run, as ratios to the baseline of the same run.

    python bench/speed_gpu.py --json              # on a GPU: full width, 18,972 and 75,888 tokens
    python bench/speed_gpu.py                     # the same as a markdown table
    python bench/speed_gpu.py --skip compile      # without the (slow to compile) compiled rows

Times one full-width DiT block (`StepVideoTransformerBlock`, dim 6144, random int8 / fp8 codes as a quantized
folder loads them, token runs and head groups of the 24gb profile) per lever, median of `--repeats` after a warm-up:
- baseline: SDPA attention, weight-only int8 matmul, eager;
- attention: flash-attn 3 / 2, SageAttention (where they pass their probe on this card);
- matmul: weight-only fp8, int8 x int8 (torch._int_mm), fp8 x fp8 (torch._scaled_mm);
- compiled: the baseline with the block torch.compile'd (compile time excluded);
- best: the fastest attention + the fastest matmul (+ compile when it helped), measured as a row of its own;
and `vae.decode_chunk` (one 3-latent chunk, untiled, random weights) at the same width. Each row's ratio is
baseline seconds / row seconds (> 1 = faster). With both token counts measured, the estimated full-video time per
cuda profile (its default preset, steps, two DiT forwards per step, 48 blocks, VAE chunks) is added as rows
"estimate <profile> baseline|best", from t(T) = a T + b T^2 fitted through the two measured sizes.

Without CUDA it runs the levers that exist on the CPU (SDPA; the three matmuls; compile) at a small size, for the
code paths and the table's shape, not for GPU decisions. `--json` prints the rows as a JSON list of objects with
lever, tokens, seconds, ratio (and component, device).

    python bench/speed_gpu.py --calibrate         # on a GPU of the card table: measure and store its efficiencies

--calibrate measures the fraction of the card's peak (lowvram_stepvideo/engines/cards.py) that a DiT-sized bf16
matmul (16,384 x 6,144 x 24,576), the attention kernel the time estimate picks for this card (8 heads of 18,972
tokens), a full-width VAE chunk decode, a 512 MiB pinned host-to-device copy and a 1 GiB device copy reach, and
stores them (cache_home()/calibration.json); the dry-run's and the sidecars' estimates for this card use them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from stream_gpu import build_stack, make_inputs  # noqa: E402

from lowvram_stepvideo.engines import attention, fast_matmul, probes  # noqa: E402
from lowvram_stepvideo.engines.attach import Attachments  # noqa: E402
from lowvram_stepvideo.engines.compile import compile_blocks  # noqa: E402
from lowvram_stepvideo.engines.cards import card_for_device  # noqa: E402
from lowvram_stepvideo.planning import calibration, estimate  # noqa: E402
from lowvram_stepvideo.files.configs import VAEConfig, VAEDecoderConfig  # noqa: E402
from lowvram_stepvideo.models.dit import set_attention_head_chunk, set_token_chunk  # noqa: E402
from lowvram_stepvideo.models.vae import AutoencoderKL  # noqa: E402
from lowvram_stepvideo.profiles import list_profiles, load_profile  # noqa: E402

FULL = {"heads": 48, "grids": [(9, 34, 62), (36, 34, 62)], "token_chunk": 16384, "head_chunk": 8,
        "vae": VAEConfig(), "vae_grid": (34, 62)}
SMALL = {"heads": 2, "grids": [(2, 6, 8), (4, 6, 8)], "token_chunk": 64, "head_chunk": 1,
         "vae": VAEConfig(z_channels=4, decoder=VAEDecoderConfig(ch=32, ch_mult=(2, 1, 1, 1))), "vae_grid": (2, 4)}
DIT_BLOCKS, CFG_FORWARDS = 48, 2


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def levers(device: torch.device, skip: set[str]) -> list[dict]:
    """The rows to measure on this machine: name, attention kernel, weight format, matmul kernel, compile."""
    base = {"attention": "sdpa", "fmt": "int8", "kernel": None, "compile": False}
    card = attention.current_target(device)
    rows = [dict(base, lever="baseline: sdpa + weight-only int8, eager")]
    if "attention" not in skip and device.type == "cuda":   # the kernels that pass their probe on this card
        rows += [dict(base, lever=f"attention {k}", attention=k) for k in ("flash3", "flash2", "sage")
                 if probes.probe_attention(k, device, torch.bfloat16).ok]
    rows.append(dict(base, lever="weight-only fp8", fmt="fp8"))
    if "matmul" not in skip:
        for fmt in ("int8", "fp8"):
            usable = device.type == "cpu" or fast_matmul.choose("fast", fmt, "cuda", card.capability)[0]
            if usable:
                rows.append(dict(base, lever=f"matmul {fmt} x {fmt}", fmt=fmt, kernel=fmt))
    if "compile" not in skip:
        rows.append(dict(base, lever="compiled", compile=True))
    return rows


def block_seconds(lever: dict, grid, size: dict, stacks: dict, device, repeats: int) -> float:
    stack = stacks[lever["fmt"]]
    set_token_chunk(stack, size["token_chunk"])
    set_attention_head_chunk(stack, size["head_chunk"])
    levers = Attachments()
    with levers:
        levers.add(attention.use_attention_backend(stack, lever["attention"]))
        levers.add(fast_matmul.attach_matmul(stack, lever["kernel"], device.type == "cuda"))
        if lever["compile"]:
            levers.add(compile_blocks(stack.transformer_blocks))
    try:
        inputs = make_inputs(grid, 1, size["heads"] * 128, device)
        return timed(lambda: stack(*inputs), repeats, device)
    finally:
        levers.detach()


def vae_seconds(size: dict, device, repeats: int) -> float:
    torch.manual_seed(0)
    vae = AutoencoderKL(size["vae"], with_encoder=False).to(device, torch.bfloat16).eval()
    z = torch.randn(1, 3, size["vae"].z_channels, *size["vae_grid"], device=device, dtype=torch.bfloat16)
    return timed(lambda: vae.decode_chunk(z), repeats, device)


def best_lever(rows: list[dict], tokens: int) -> dict:
    """Fastest attention and matmul rows at `tokens` combined, compiled if compiling helped."""
    at = {r["lever"]: r for r in rows if r["tokens"] == tokens}
    base = at["baseline: sdpa + weight-only int8, eager"]

    def fastest(prefix: str, default: dict) -> dict:
        found = [r for name, r in at.items() if name.startswith(prefix)] + [default]
        return min(found, key=lambda r: r["seconds"])
    att, mm = fastest("attention ", base), fastest("matmul ", base)
    compiled = "compiled" in at and at["compiled"]["seconds"] < base["seconds"]
    kernel, fmt = mm["spec"]["kernel"], mm["spec"]["fmt"]
    matmul = f"{kernel} x {kernel}" if kernel else f"weight-only {fmt}"
    return {"attention": att["spec"]["attention"], "fmt": fmt, "kernel": kernel, "compile": compiled,
            "lever": f"best: {att['spec']['attention']} + {matmul}" + (", compiled" if compiled else ", eager")}


def measure(device: torch.device, size: dict, skip: set[str], repeats: int) -> list[dict]:
    stacks = {fmt: build_stack(size["heads"], 1, fmt).to(device) for fmt in ("int8", "fp8")}
    specs, rows = levers(device, skip), []
    for grid in size["grids"]:
        tokens = grid[0] * grid[1] * grid[2]
        for spec in specs:
            rows.append({"component": "dit block", "lever": spec["lever"], "tokens": tokens, "spec": spec,
                         "seconds": block_seconds(spec, grid, size, stacks, device, repeats)})
        best = best_lever(rows, tokens)
        rows.append({"component": "dit block", "lever": best["lever"], "tokens": tokens, "spec": best,
                     "seconds": block_seconds(best, grid, size, stacks, device, repeats)})
    vae_tokens = 3 * size["vae_grid"][0] * size["vae_grid"][1]
    rows.append({"component": "vae chunk", "lever": "vae.decode_chunk (3 latents, untiled)", "tokens": vae_tokens,
                 "seconds": vae_seconds(size, device, repeats)})
    return rows


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        base = next((b for b in rows if b["lever"].startswith("baseline") and b["tokens"] == r["tokens"]
                     and b["component"] == r["component"]), None)
        r["ratio"] = round(base["seconds"] / r["seconds"], 3) if base else None


def estimates(rows: list[dict], grids) -> list[dict]:
    """Full-video seconds per cuda profile (default preset) for the baseline and the best lever at full length."""
    t1, t2 = (g[0] * g[1] * g[2] for g in grids)
    vae = next(r["seconds"] for r in rows if r["component"] == "vae chunk")
    out = []
    for which in ("baseline", "best"):
        s1, s2 = (next(r["seconds"] for r in rows if r["tokens"] == t and r["lever"].startswith(which))
                  for t in (t1, t2))
        b = (s2 / t2 - s1 / t1) / (t2 - t1)            # t(T) = a T + b T^2 through both points
        a = s1 / t1 - b * t1
        for name in list_profiles():
            profile = load_profile(name)
            if profile.device != "cuda":
                continue
            p = profile.default_preset
            per_block = a * p.tokens + b * p.tokens ** 2
            chunks = -(-(p.frames // 17 * 3) // 3)
            total = p.steps * CFG_FORWARDS * DIT_BLOCKS * per_block + chunks * vae
            out.append({"component": "estimate", "lever": f"estimate {name} {which} ({p}, {p.steps} steps)",
                        "tokens": p.tokens, "seconds": round(total, 1), "ratio": None})
    return out


def calibrate(device: torch.device, repeats: int) -> dict:
    """Measure this card's efficiencies (see the module docstring) and store them; what was stored."""
    props = torch.cuda.get_device_properties(device)
    card = card_for_device(props.name, props.total_memory)
    if card is None or not card.tflops("bf16"):
        why = "is not in the card table (generate.py --list-cards)" if card is None else "has no bf16 tensor cores"
        raise ValueError(f"{props.name} {why}: the time estimate does not cover it")
    kernel = estimate.attention_kernel(load_profile("24gb"), card)
    measured = {"matmul": _matmul(device, repeats), "attention": _attention(kernel, device, repeats),
                "conv": _vae(device, repeats), "host_link": _pinned_copy(device, repeats),
                "memory": _device_copy(device, repeats)}
    found = estimate.calibrated(card, kernel, measured)
    path = calibration.store(card, found, props.name)
    return {"card": card.name, "device": props.name, "attention_kernel": kernel, "efficiency": found,
            "file": str(path)}


def _matmul(device, repeats: int) -> tuple[float, float]:
    m, k, n = 16384, 6144, 24576
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    return 2.0 * m * k * n, timed(lambda: a @ b, repeats, device)


def _attention(kernel: str, device, repeats: int) -> tuple[float, float]:
    """`kernel` as estimate.attention_kernel names it: "sage", "sdpa (float16)", "sdpa (math kernel)"."""
    s, h, d = 9 * 34 * 62, 8, 128
    q, k, v = (torch.randn(1, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    attend = attention.run_function(kernel.split(" ")[0], "float16" if kernel.endswith("(float16)") else None)
    return 4.0 * s * s * h * d, timed(lambda: attend(q, k, v), repeats, device)


def _vae(device, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    vae = AutoencoderKL(FULL["vae"], with_encoder=False).to(device, torch.bfloat16).eval()
    z = torch.randn(1, 3, FULL["vae"].z_channels, *FULL["vae_grid"], device=device, dtype=torch.bfloat16)
    with torch.inference_mode(), FlopCounterMode(display=False) as flops:
        vae.decode_chunk(z)
    return float(flops.get_total_flops()), timed(lambda: vae.decode_chunk(z), repeats, device)


def _pinned_copy(device, repeats: int) -> tuple[float, float]:
    src = torch.empty(2**29, dtype=torch.uint8).pin_memory()
    dst = torch.empty(2**29, dtype=torch.uint8, device=device)
    return float(src.numel()), timed(lambda: dst.copy_(src, non_blocking=True), repeats, device)


def _device_copy(device, repeats: int) -> tuple[float, float]:
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel(), timed(lambda: dst.copy_(src), repeats, device)   # read and written


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"speed levers on {device_name} (ratio = baseline seconds / row seconds)", "",
             "| component | lever | tokens | seconds | ratio |", "|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['component']} | {r['lever']} | {r['tokens']:,} | {r['seconds']:.4g} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of lever groups to leave out: attention,matmul,compile")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this card's efficiencies for the time estimate and store them")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.calibrate:
        if device.type != "cuda":
            print("error: --calibrate measures a CUDA card; none was found", file=sys.stderr)
            return 2
        try:
            found = calibrate(device, args.repeats)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(found, indent=1))
        return 0
    size = FULL if device.type == "cuda" else SMALL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (small size, no GPU)"
    rows = measure(device, size, set(filter(None, args.skip.split(","))), args.repeats)
    add_ratios(rows)
    if device.type == "cuda":
        rows += estimates(rows, size["grids"])
    for r in rows:
        r.pop("spec", None)
        r["device"] = name
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
