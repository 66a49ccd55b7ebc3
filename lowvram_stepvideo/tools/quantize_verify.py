"""Verification of a quantized folder: the relative error of sampled rows of every quantized layer against the
source, and its table (printed by quantize.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files.weights import open_weights
from ..models import quant
from .quantize_io import BLOCK_ELEMS, TensorReader


@dataclass(frozen=True)
class VerifyRow:
    component: str
    tensor: str
    shape: tuple[int, ...]
    rel_error: float | None      # None: the original weight is all zeros


def verify_folder(dst: Path, jobs: list, samples: int = 8, batch: int = 16) -> list[VerifyRow]:
    """Relative error of sampled quantized layers against the originals: ||x Wq^T - x W^T|| / ||x W^T|| for
    random x (linears), ||Wq - W|| / ||W|| over all rows (embeddings). Reads both a block of rows at a time."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for job in (j for j in jobs if j.plan):
        out = TensorReader(open_weights(dst / job.spec.folder, (job.spec.out_stem,)))
        src = TensorReader(job.source)
        src_key = {t.name: t.source for s in job.shards for t in s.tensors if t.role == "codes"}
        names = list(job.plan)
        picks = sorted({names[round(i * (len(names) - 1) / max(samples - 1, 1))] for i in range(samples)})
        for name in picks:
            err = _layer_error(src, src_key[name], out, name, job.plan[name], batch, gen)
            rows.append(VerifyRow(job.component, name, job.source.ref(src_key[name]).shape, err))
        src.close()
        out.close()
    return rows


def _layer_error(src: TensorReader, src_key: str, out: TensorReader, name: str, kind: str, batch: int, gen):
    n_rows, cols = src.geometry(src_key)
    x = torch.randn(batch, cols, generator=gen)
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    num = den = 0.0
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        w = src.rows(src_key, r0, r1).float()                                         # (r, cols)
        wq = quant.dequantize(out.rows(name, r0, r1), out.rows(quant.scale_name(name), r0, r1).reshape(-1),
                              torch.float32)
        ref, got = (w, wq) if kind == "embedding" else (x @ w.T, x @ wq.T)            # (batch, r) for linears
        num += (got - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else None


def format_verify_table(rows: list[VerifyRow]) -> str:
    width = max([len(r.tensor) for r in rows] + [6])
    lines = [f"{'component':<13} {'tensor':<{width}} {'shape':<14} rel. error"]
    for r in rows:
        err = "n/a (zero weight)" if r.rel_error is None else f"{100 * r.rel_error:.3f}%"
        lines.append(f"{r.component:<13} {r.tensor:<{width}} {'x'.join(map(str, r.shape)):<14} {err}")
    scored = [r for r in rows if r.rel_error is not None]
    if scored:
        worst = max(scored, key=lambda r: r.rel_error)
        lines.append(f"worst layer: {worst.component} {worst.tensor} {100 * worst.rel_error:.3f}%")
    else:
        lines.append("worst layer: none (every sampled original weight is zero)")
    return "\n".join(lines)
