"""The efficiencies behind the time estimate (estimate.py): the fraction of a card's peak a run reaches, per kind of
work. ASSUMED until measured; `bench/speed_gpu.py --calibrate` measures them on the card at hand and stores them in
cache_home()/calibration.json, keyed by the card table's name, and estimates for that card use them from then on.

An efficiency is the estimate's seconds at full peak over the seconds measured for the same work (a DiT-sized bf16
matmul, the attention kernel the estimate picks at DiT size, a VAE-sized convolution, a pinned host-to-device copy,
a device copy for memory bandwidth), so the estimate reproduces the measurements.
"""
from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import torch

from ..engines.cards import Card
from ..files.caches import cache_home, read_cache_json
from ..files.fsutil import atomic_path

log = logging.getLogger(__name__)
# Assumptions, not measurements: large bf16 GEMMs reach 60-75% of peak, flash-attention kernels about half (FA2's
# authors report ~70% on A100, less on consumer cards), cuDNN's 3D convolutions with few channels less; pinned
# copies ~80% of the PCIe link (~25 of 31.5 GB/s on PCIe 4.0 x16); a streaming kernel ~80% of memory bandwidth.
ASSUMED = {"matmul": 0.6, "attention": 0.5, "conv": 0.35, "host_link": 0.8, "memory": 0.8}
VALID = (0.01, 1.5)    # above 1: a card clocked above its reference boost clock
FILE_NAME = "calibration.json"


def calibration_file() -> Path:
    return cache_home() / FILE_NAME


def _read() -> dict:
    return read_cache_json(calibration_file())


def efficiencies(card: Card) -> tuple[dict[str, float], bool]:
    """(efficiency per kind of work, whether any was measured on this card); unmeasured kinds are ASSUMED. A
    damaged entry is ignored with a warning (the assumptions stand)."""
    entry = _read().get(card.name)
    measured = entry.get("efficiency") if isinstance(entry, dict) else None
    if not isinstance(measured, dict):
        return dict(ASSUMED), False
    good = {k: float(v) for k, v in measured.items() if k in ASSUMED and _valid(v)}
    if len(good) != len(measured):
        log.warning("%s: ignoring unreadable calibration values for %s", calibration_file(), card.name)
    return {**ASSUMED, **good}, bool(good)


def _valid(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and VALID[0] <= value <= VALID[1]


def efficiency(seconds_at_peak: float, measured_seconds: float) -> float:
    """The fraction of peak a measurement reached: the estimate's seconds at 100% over the seconds measured."""
    if measured_seconds <= 0 or seconds_at_peak <= 0:
        raise ValueError(f"efficiency needs positive times, got {seconds_at_peak} and {measured_seconds}")
    return seconds_at_peak / measured_seconds


def store(card: Card, measured: dict[str, float], device_name: str) -> Path:
    """Keep the efficiencies measured on `card` (kinds of ASSUMED, each within VALID); returns the file."""
    bad = {k: v for k, v in measured.items() if k not in ASSUMED or not _valid(v)}
    if bad:
        raise ValueError(f"calibration values out of range or unknown: {bad} (kinds: {', '.join(ASSUMED)}; "
                         f"range {VALID[0]}-{VALID[1]})")
    data = _read()
    data[card.name] = {"efficiency": {k: round(float(v), 4) for k, v in measured.items()}, "device": device_name,
                       "torch": torch.__version__, "measured": datetime.date.today().isoformat()}
    path = calibration_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    return path
