"""What block streaming holds in memory: the engine's own report against `streaming_footprint`, the packed
budget (ram only, clamped to the machine), page-locking failures, and detach without a host RAM spike."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowvram_stepvideo import offload, offload_store
from lowvram_stepvideo.offload import (PACKED_RAM_MARGIN, BlockStreamer, Footprint, attach_streaming,
                                       clamp_packed_budget, offload_component, streaming_footprint)
from lowvram_stepvideo.offload_store import BlockLayout
from test_offload import fake_cuda, load_toy, write_toy  # noqa: F401  (fake_cuda is a fixture)

DIM, N = 32, 7


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), dim=DIM, n=N)


def _other_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.startswith("transformer_blocks."))


# (resident, prefetch, source, budget in blocks)
SETTINGS = [(0, 0, "ram", 100), (0, 1, "ram", 0), (1, 2, "ram", 2.5), (3, 1, "ram", 1), (2, 0, "disk", 100),
            (0, 3, "disk", 0), (N, 1, "ram", 100), ([6, 2], 1, "ram", 3)]


@pytest.mark.parametrize("resident,prefetch,source,budget_blocks", SETTINGS)
def test_live_engine_reports_the_planned_footprint_cpu(toy_dir, resident, prefetch, source, budget_blocks):
    model = load_toy(toy_dir, DIM, N, torch.bfloat16)
    block = BlockLayout(model.transformer_blocks[0]).nbytes      # before attaching parks the blocks
    budget = int(budget_blocks * block)
    want = streaming_footprint(block, N, _other_bytes(model), resident, prefetch, source, budget, False,
                               arena_bytes=1024)
    engine = attach_streaming(model, "cpu", resident=resident, prefetch=prefetch, source=source,
                              pin_budget_bytes=budget, arena_bytes=1024)
    assert engine.footprint() == want
    assert want.host_bytes == engine.stats.packed_bytes          # no staging without CUDA
    assert (want.host_bytes > 0) == (source == "ram" and budget_blocks >= 1 and engine.stats.slots > 0)
    offload_component(model)
    assert engine.footprint() == Footprint(0, 0)


@pytest.mark.parametrize("resident,prefetch,source,budget_blocks", SETTINGS)
def test_live_engine_reports_the_planned_footprint_cuda(toy_dir, fake_cuda, resident, prefetch, source,
                                                        budget_blocks):
    """The CUDA branch (staging ring for unpacked blocks) with the fake streams of test_offload."""
    model = load_toy(toy_dir, DIM, N, torch.bfloat16)
    budget = int(budget_blocks * BlockLayout(model.transformer_blocks[0]).nbytes)
    engine = BlockStreamer(model.transformer_blocks, "cpu", resident=resident, prefetch=prefetch, source=source,
                           pin_budget_bytes=budget, weight_refs=model.weight_refs, prefix="transformer_blocks.",
                           staging_bytes=3000, staging_buffers=2, arena_bytes=1024)
    engine.cuda = True
    engine.attach()
    want = streaming_footprint(engine.layout.nbytes, N, 0, resident, prefetch, source, budget, True,
                               arena_bytes=1024, staging_bytes=3000, staging_buffers=2)
    assert engine.footprint() == want
    unpacked = engine.stats.pageable_blocks + engine.stats.disk_blocks
    assert want.host_bytes == engine.stats.packed_bytes + (2 * 3000 if unpacked else 0)
    engine.detach()


def test_packed_budget_is_clamped_to_available_ram(toy_dir, monkeypatch):
    assert clamp_packed_budget(10 * 2**30, available_bytes=8 * 2**30) == 8 * 2**30 - PACKED_RAM_MARGIN
    assert clamp_packed_budget(2**30, available_bytes=64 * 2**30) == 2**30
    assert clamp_packed_budget(2**30, available_bytes=2**30) == 0
    model = load_toy(toy_dir, DIM, N, torch.bfloat16)
    block = BlockLayout(model.transformer_blocks[0]).nbytes
    monkeypatch.setattr(offload, "available_ram_bytes", lambda: PACKED_RAM_MARGIN + 2 * block)
    engine = attach_streaming(model, "cpu", pin_budget_bytes=2**40, arena_bytes=512)
    assert engine.stats.pin_budget_bytes == 2 * block and engine.stats.packed_blocks == 2
    offload_component(model)


@pytest.mark.parametrize("source,pins_granted", [("ram", 3), ("disk", 0)])
def test_failed_page_locking_falls_back_with_one_warning(toy_dir, fake_cuda, monkeypatch, caplog, source,
                                                         pins_granted):
    """Page-locking refused after `pins_granted` buffers: the blocks held by the arenas made stay packed, the rest
    come from pageable RAM (or disk), staging is pageable; the outputs are unchanged and exactly one warning line
    is logged."""
    pinned = []

    def host_buffer(n, pin):
        if pin and len(pinned) >= pins_granted:
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        if pin:
            pinned.append(n)
        return torch.empty(n, dtype=torch.uint8)

    monkeypatch.setattr(offload_store, "host_buffer", host_buffer)
    caplog.set_level("INFO", logger="lowvram_stepvideo.offload")
    model = load_toy(toy_dir, DIM, N, torch.bfloat16)
    x = torch.randn(3, DIM, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = model(x)
    block = BlockLayout(model.transformer_blocks[0]).nbytes
    engine = BlockStreamer(model.transformer_blocks, "cpu", prefetch=1, source=source, pin_budget_bytes=2**30,
                           weight_refs=model.weight_refs, prefix="transformer_blocks.", arena_bytes=1024)
    engine.cuda = True
    engine.attach()
    with torch.inference_mode():
        assert torch.equal(model(x), plain)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "could not page-lock" in warnings[0].getMessage()
    packed = 3 * 1024 // block if source == "ram" else 0
    assert (engine.stats.packed_blocks, engine.stats.pageable_blocks + engine.stats.disk_blocks) == (packed, N - packed)
    assert all(buf.numel() > 0 for buf, _ in engine._staging)   # pageable staging was made
    engine.detach()
    with torch.inference_mode():
        assert torch.equal(model(x), plain)
