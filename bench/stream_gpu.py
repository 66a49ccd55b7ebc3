#!/usr/bin/env python3
"""Per-forward time of a stack of full-width DiT blocks: all resident on the GPU vs streamed by BlockStreamer.

    python bench/stream_gpu.py [--layers 8] [--format int8] [--grids 3x34x31,9x34x62,36x34x62] [--batches 1,2]
                               [--resident 0,2,4] [--prefetch 2] [--json out.json]
    python bench/stream_gpu.py --tiny --device cpu          # every code path except CUDA timing, in seconds

Blocks are `StepVideoTransformerBlock`s (dim 6144 = 48 heads x 128) with random int8/fp8 codes (quant.QuantLinear,
the modules a quantized folder loads into) or bf16 weights. Block 0 gets random values and the other blocks copies,
which changes nothing for time or traffic. Token grids are latent (frames x height x width): 3x34x31 = 3,162,
9x34x62 = 18,972, 36x34x62 = 75,888 (204 frames at 544x992). Streamed blocks live in page-locked RAM
(source="ram"), `--prefetch` blocks ahead. Per row, over the forwards after one warm-up: median forward time,
ratio to resident, blocks and bytes copied per forward (fewer blocks than streamed when some stay in a slot from the
forward before) and the rate that amounts to, host stall, peak VRAM. The pinned->device copy rate of one block image
is measured once for reference. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowvram_stepvideo.models import quant  # noqa: E402
from lowvram_stepvideo.loading.assign import build_on_meta
from lowvram_stepvideo.files.configs import DiTConfig  # noqa: E402
from lowvram_stepvideo.models.dit import StepVideoTransformerBlock, rope_tables, set_token_chunk  # noqa: E402
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component, to_device  # noqa: E402

GiB = 2**30
TEXT_TOKENS = 142          # CLIP 77 + a typical 65-token step_llm prompt (the cross-attention keys)
TINY = {"heads": 2, "layers": 4, "grids": "1x2x3,2x2x3", "batches": "1,2", "resident": "0,1", "repeats": 1,
        "prefetch": 1, "ffn_chunk": 4}


class BlockStack(nn.Module):
    """Just the block loop of StepVideoModel.forward, so attach_streaming finds `transformer_blocks`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(StepVideoTransformerBlock(config) for _ in range(config.num_layers))

    def forward(self, h, enc, mod, kv_mask, rope_cos, rope_sin):
        for block in self.transformer_blocks:
            h = block(h, enc, mod, kv_mask, rope_cos, rope_sin)
        return h


def build_stack(heads: int, layers: int, fmt: str) -> BlockStack:
    """Host-side stack: meta build, quantized-module swap, then block 0 random and the others copies of it."""
    config = DiTConfig(num_layers=layers, num_heads=heads, head_dim=128)
    stack = build_on_meta(lambda: BlockStack(config)).to(torch.bfloat16)   # quantized scales: float32 below
    if fmt != "bf16":
        names = [name for name, _ in stack.named_parameters()]
        quant.swap_modules(stack, quant.plan_quantization("transformer", names), quant.get_format(fmt))
    stack.to_empty(device="cpu").requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(0)
    first = dict(stack.transformer_blocks[0].named_parameters())
    for name, p in first.items():
        _fill(p, name, first, gen)
    for block in stack.transformer_blocks[1:]:
        for name, p in block.named_parameters():
            p.copy_(first[name])
    return stack


def _fill(p: torch.Tensor, name: str, params: dict, gen: torch.Generator) -> None:
    if p.dtype in (torch.int8, torch.float8_e4m3fn):      # codes in [-127, 127]; scale gives std ~ 1/sqrt(in)
        p.copy_(torch.randint(-127, 128, p.shape, generator=gen, dtype=torch.int8).to(p.dtype))
    elif name.endswith(".scale"):
        fan_in = params[name.removesuffix(".scale") + ".weight"].shape[1]
        p.fill_(3 ** 0.5 / (127 * fan_in ** 0.5))
    elif p.dim() == 2 and not name.startswith("scale_shift_table"):   # bf16 linear weight
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    elif name.endswith("bias") or name.startswith("scale_shift_table"):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    else:                                                  # norm weights
        p.fill_(1.0)


def make_inputs(grid: tuple[int, int, int], batch: int, dim: int, device) -> tuple:
    f, h, w = grid
    tokens = f * h * w
    gen = torch.Generator().manual_seed(1)
    bf16 = dict(dtype=torch.bfloat16)
    hidden = torch.randn(batch, tokens, dim, generator=gen).to(device, **bf16)        # (B, S, D)
    enc = torch.randn(batch, TEXT_TOKENS, dim, generator=gen).to(device, **bf16)      # (B, Skv, D)
    mod = (torch.randn(batch, 6 * dim, generator=gen) * 0.1).to(device, **bf16)      # (B, 6D)
    kv_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device)
    cos, sin = rope_tables(f, h, w, torch.bfloat16, device)                         # (S, 128) each
    return hidden, enc, mod, kv_mask, cos, sin


def time_forward(stack: nn.Module, inputs: tuple, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` forwards."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            stack(*inputs)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def run_mode(stack, mode: str, resident: int, args, device) -> list[dict]:
    """Time every (grid, batch) with the stack resident or streamed with `resident` blocks kept."""
    if mode == "resident":
        engine = None
        to_device(stack, device)
    else:
        engine = attach_streaming(stack, device, resident=resident, prefetch=args.prefetch, source="ram",
                                  pin_budget_bytes=args.pin_budget_gb * GiB)
    rows = []
    for grid in args.grids:
        for batch in args.batches:
            rows.append(measure(stack, engine, grid, batch, args, device) | {"mode": mode, "resident": resident})
    offload_component(stack)
    return rows


def measure(stack, engine, grid, batch, args, device) -> dict:
    inputs = make_inputs(grid, batch, args.dim, device)
    time_forward(stack, inputs, 1, device)              # warm-up (kernels, allocator, first fetches)
    before = engine.stats.bytes_moved if engine else 0
    fetched, forwards, stall = (engine.stats.blocks_fetched, engine.stats.forwards, engine.stats.stall_s) \
        if engine else (0, 0, 0.0)
    _peak_reset(device)
    seconds = time_forward(stack, inputs, args.repeats, device)
    row = {"tokens": grid[0] * grid[1] * grid[2], "grid": "x".join(map(str, grid)), "batch": batch,
           "seconds": seconds, "peak_vram_gib": _peak(device), "moved_gb": 0.0, "stall_s": 0.0, "blocks": 0.0}
    if engine:
        n = engine.stats.forwards - forwards
        row["moved_gb"] = (engine.stats.bytes_moved - before) / n / 1e9
        row["blocks"] = (engine.stats.blocks_fetched - fetched) / n
        row["stall_s"] = (engine.stats.stall_s - stall) / n
    del inputs
    return row


def link_rate(stack, device) -> float | None:
    """GB/s of one block image copied from page-locked RAM to the device (CUDA only)."""
    if device.type != "cuda":
        return None
    block = stack.transformer_blocks[0]
    nbytes = sum(p.numel() * p.element_size() for p in block.parameters())
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    _sync(device)
    return 5 * nbytes / (time.perf_counter() - start) / 1e9


def add_ratios(rows: list[dict]) -> None:
    base = {(r["tokens"], r["batch"]): r["seconds"] for r in rows if r["mode"] == "resident"}
    for r in rows:
        r["ratio"] = r["seconds"] / base[(r["tokens"], r["batch"])]
        r["rate_gbs"] = r["moved_gb"] / r["seconds"] if r["moved_gb"] else 0.0


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| tokens (grid) | batch | mode | ms / forward | x resident | blocks copied / fwd "
             "| GB copied / fwd | GB/s | host stall ms | peak VRAM GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["batch"], r["mode"] != "resident", r["resident"])):
        mode = "resident" if r["mode"] == "resident" else f"streamed, {r['resident']} resident"
        vram = "n/a" if r["peak_vram_gib"] is None else f"{r['peak_vram_gib']:.2f}"
        lines.append(f"| {r['tokens']} ({r['grid']}) | {r['batch']} | {mode} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['ratio']:.3f} | {r['blocks']:.3g} | {r['moved_gb']:.3f} | {r['rate_gbs']:.1f} | "
                     f"{r['stall_s'] * 1e3:.1f} | {vram} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="2 heads (dim 256), 3 layers, tiny grids: a CPU smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--layers", type=int, default=8, help="blocks in the stack (48 in the model)")
    p.add_argument("--format", choices=["int8", "fp8", "bf16"], default="int8")
    p.add_argument("--grids", default="3x34x31,9x34x62,36x34x62", help="latent FxHxW grids")
    p.add_argument("--batches", default="1,2")
    p.add_argument("--resident", default="0,2,4", help="resident block counts of the streamed runs")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ffn-chunk", type=int, default=16384, help="FFN token chunk (as the 24gb profile)")
    p.add_argument("--pin-budget-gb", type=float, default=64.0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    args.dim = args.heads * 128
    args.grids = [tuple(int(v) for v in g.split("x")) for g in args.grids.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.resident = [int(r) for r in args.resident.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu (with --tiny)")
    stack = build_stack(args.heads, args.layers, args.format)
    set_token_chunk(stack, args.ffn_chunk)
    rows = run_mode(stack, "resident", args.layers, args, device)
    for resident in args.resident:
        rows += run_mode(stack, "streamed", resident, args, device)
    add_ratios(rows)
    link = link_rate(stack, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"{args.layers} DiT blocks, dim {args.dim}, {args.format}, prefetch {args.prefetch}, on {name}; "
              f"pinned->device copy of one block: {'n/a' if link is None else f'{link:.1f} GB/s'}")
    print(markdown(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "link_gbs": link, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
