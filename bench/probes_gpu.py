#!/usr/bin/env python3
"""The card at hand against the card table, and every kernel probed on it (lowvram_stepvideo/engines/probes.py).

    python bench/probes_gpu.py        # markdown; exit 1 when the card is not the table's, 2 without CUDA

Card: torch's device name and memory found in the card table (cards.card_for_device), its compute capability
against the table's, and what the table says that capability runs (cards.capabilities). Probes, each on small
DiT-shaped tensors against float32 SDPA: flash-attn 3 and 2, SageAttention and SDPA in bf16 and fp16 at the
precision a run uses on this card, SDPA on float16 copies of bf16 inputs (what Turing and Volta run) and the exact
float32 path, the fast matmuls (int8 x int8, fp8 x fp8), each attention kernel that passes also timed on one
self-attention call (probes.TIMED: 4096 tokens x 48 heads); then what a run of the 24gb profile (attention auto,
the fastest that passed) attaches here. A kernel the table lists for the card that fails, or one it does not list that passes, is marked:
the table may need a change. Results are also kept where probes are cached (cache_home()/probes.json).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowvram_stepvideo.engines import attention, probes  # noqa: E402
from lowvram_stepvideo.engines.cards import capabilities, card_for_device  # noqa: E402
from lowvram_stepvideo.engines.target import Target  # noqa: E402
from lowvram_stepvideo.profiles import load_profile  # noqa: E402

GiB = 2**30
ATTENTION = ("flash3", "flash2", "sage", "sdpa")


def card_lines(name: str, total_bytes: int, capability: tuple[int, int]) -> tuple[bool, list[str]]:
    """(whether the card is the table's with the same capability, the report's lines)."""
    cap = f"{capability[0]}.{capability[1]}"
    card = card_for_device(name, total_bytes)
    if card is None:
        return False, [f"card: {name} ({total_bytes / GiB:.1f} GiB, compute capability {cap}) is NOT in the card "
                       "table (lowvram_stepvideo/engines/cards.py): add it, with its device name"]
    same = card.capability == tuple(capability)
    caps = capabilities(capability)
    lines = [f"card: {name} ({total_bytes / GiB:.1f} GiB, compute capability {cap}) is the table's {card.name} "
             f"({card.vram_gib:g} GB, {card.capability_text})" + ("" if same else ": the capability DIFFERS"),
             f"table for {cap}: {caps.arch}; attention kernels {', '.join(caps.attention_kernels)}; bf16 tensor cores "
             f"{_yes(caps.bf16_tensor_cores)}, fused bf16 attention {_yes(caps.bf16_fused_attention)}, int8 matmul "
             f"{_yes(caps.int8_mm)}, fp8 matmul {_yes(caps.fp8_mm)}"]
    lines += [f"table note: {note}" for note in caps.notes]
    return same, lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def probe_rows(device, capability: tuple[int, int]) -> list[str]:
    """The probe table's markdown rows."""
    listed = capabilities(capability).attention_kernels
    rows = ["| dtype | kernel | card table | result | relative error | ms per call | reason |",
            "|---|---|---|---|---:|---:|---|"]

    def row(dtype: str, found: probes.Probe, in_table: bool | None) -> None:
        table = "" if in_table is None else ("lists it" if in_table else "does not list it")
        mark = " (table?)" if in_table is not None and in_table != found.ok and "not importable" not in found.reason \
            else ""
        error = "" if found.error is None else f"{found.error:.2g}"
        ms = "" if found.seconds is None else f"{found.seconds * 1e3:.3g}"
        rows.append(f"| {dtype} | {found.kernel} | {table} | {'passed' if found.ok else 'failed'}{mark} | {error} | "
                    f"{ms} | {found.reason} |")
    for dtype in (torch.bfloat16, torch.float16):
        precision = attention.attention_precision(capability, dtype)
        for kernel in ATTENTION:
            row(str(dtype), probes.probe_attention(kernel, device, dtype, 128, precision), kernel in listed)
    row("torch.bfloat16", probes.probe_attention("sdpa", device, torch.bfloat16, 128, "float16"), None)
    row("torch.bfloat16", probes.probe_attention("sdpa", device, torch.bfloat16, 128, "float32"), None)
    for fmt in ("int8", "fp8"):
        row("torch.bfloat16", probes.probe_matmul(fmt, device, torch.bfloat16), None)
    return rows


def report(device, name: str, total_bytes: int, capability: tuple[int, int]) -> tuple[bool, str]:
    same, lines = card_lines(name, total_bytes, capability)
    lines += ["", f"probes on {probes.device_key(device)}:", ""] + probe_rows(device, capability)
    run = probes.choose_run_attention(load_profile("24gb"), Target(tuple(capability), name), device)
    precision = f" in {run.precision}" if run.precision else ""
    lines += ["", f"a run of the 24gb profile (attention auto) attaches: {run.kernel}{precision} ({run.why})"]
    return same, "\n".join(lines)


def main() -> int:
    if not torch.cuda.is_available():
        print("error: bench/probes_gpu.py probes a CUDA card; none was found", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    same, text = report(device, props.name, props.total_memory, (props.major, props.minor))
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
