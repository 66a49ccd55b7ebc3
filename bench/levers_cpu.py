#!/usr/bin/env python3
"""Error of the inexact speed levers on the tiny fixture model (CPU, float32), for BENCHMARKS.md.

    python bench/levers_cpu.py [--fixture tests/data/fixtures/tiny-public] [--steps 30]

- fast matmul: the fixture DiT quantized to int8 / fp8, DiT `out.x` (dit_io) and the latents after the fixture's 3
  steps and after `--steps` steps (its prompt embeddings and noise, sequential CFG 9, shift 13), fast against
  weight-only (relative Frobenius error); the kernels are forced on the CPU, where `--matmul fast` itself would fall
  back to weight-only.
- step cache: `--steps` steps uncached and cached at several thresholds: full and cached DiT evaluations and the
  final latents' error against the uncached run. Random weights: what a threshold does to a real video is not
  measured here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowvram_stepvideo.engines import fast_matmul
from lowvram_stepvideo.models import quant  # noqa: E402
from lowvram_stepvideo.loading.loaders import load_dit  # noqa: E402
from lowvram_stepvideo.pipeline.sampling import cfg_combine, euler_step, flow_sigmas  # noqa: E402
from lowvram_stepvideo.engines.step_cache import FirstBlockCache  # noqa: E402

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)   # the tiny model's block-0 residual moves 0.23-0.47 per step


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def denoise(dit, io: dict, sigmas: torch.Tensor, cache: FirstBlockCache | None = None) -> torch.Tensor:
    """Sequential CFG Euler steps from the fixture's noise with its prompt pair."""
    x = io["step0.latents_in"]
    y, mask, clip = io["caption.y"], io["caption.y_mask"].float(), io["caption.clip_embedding"]
    steps = len(sigmas) - 1
    with torch.no_grad():
        for i in range(steps):
            if cache:
                cache.start_step(i, steps)
            v = []
            for b, name in enumerate(("cond", "uncond")):
                with cache.branch(name) if cache else torch.no_grad():
                    v.append(dit(x, (sigmas[i] * torch.ones(1)), y[b:b + 1], clip[b:b + 1], mask[b:b + 1]))
            x = euler_step(x, cfg_combine(v[0], v[1], 9.0), sigmas[i], sigmas[i + 1])
    return x


def matmul_rows(fixture: Path, io: dict, steps: int) -> list[str]:
    dit_io = load_file(str(fixture / "dit_io.safetensors"))
    inputs = [dit_io[f"in.{k}"] for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                           "encoder_hidden_states_2", "encoder_attention_mask")]
    rows = ["| format | out.x: fast vs weight-only | out.x: weight-only vs float reference | "
            f"latents after 3 steps | latents after {steps} steps |", "|---|---:|---:|---:|---:|"]
    for fmt in ("int8", "fp8"):
        dit = load_dit(fixture / "model_dir" / "transformer", dtype=torch.float32)
        names = [n for n, _ in dit.named_parameters()]
        quant.quantize_model(dit, quant.FORMATS[fmt], quant.plan_quantization("transformer", names))
        out = {}
        for mode in ("weight-only", "fast"):
            matmul = fast_matmul.attach_matmul(dit, fmt if mode == "fast" else None, cuda=False)
            with torch.no_grad():
                out[mode] = (dit(*inputs), denoise(dit, io, io["sigmas"]), denoise(dit, io, flow_sigmas(steps, 13.0)))
            matmul.detach()
        errs = [rel(f, w) for f, w in zip(out["fast"], out["weight-only"])]
        rows.append(f"| {fmt} | {errs[0]:.2%} | {rel(out['weight-only'][0], dit_io['out.x']):.2%} | "
                    f"{errs[1]:.2%} | {errs[2]:.2%} |")
    return rows


def cache_rows(fixture: Path, io: dict, steps: int) -> list[str]:
    dit = load_dit(fixture / "model_dir" / "transformer", dtype=torch.float32)
    sigmas = flow_sigmas(steps, 13.0)
    plain = denoise(dit, io, sigmas)
    rows = [f"| threshold | full | cached | evaluations saved | latents vs uncached ({steps} steps) |",
            "|---:|---:|---:|---:|---:|"]
    for threshold in THRESHOLDS:
        cache = FirstBlockCache(threshold, max_reuse=2).attach(dit)
        got = denoise(dit, io, sigmas, cache)
        c = cache.counts()
        cache.detach()
        saved = c["cached"] / (c["full"] + c["cached"])
        rows.append(f"| {threshold} | {c['full']} | {c['cached']} | {saved:.0%} | {rel(got, plain):.3%} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fixture", type=Path, default=ROOT / "tests" / "data" / "fixtures" / "tiny-public")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    io = load_file(str(args.fixture / "pipeline_io.safetensors"))
    print("\n".join(matmul_rows(args.fixture, io, args.steps)))
    print()
    print("\n".join(cache_rows(args.fixture, io, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
