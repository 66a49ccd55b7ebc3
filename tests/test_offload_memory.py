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

from lowvram_stepvideo.engines import host_store, streaming
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component
from lowvram_stepvideo.engines.streaming import (
    PACKED_RAM_MARGIN,
    BlockStreamer,
    Footprint,
    clamp_packed_budget,
    streaming_footprint)
from lowvram_stepvideo.engines.host_store import BlockLayout
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
    monkeypatch.setattr(streaming, "available_ram_bytes", lambda: PACKED_RAM_MARGIN + 2 * block)
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

    monkeypatch.setattr(host_store, "host_buffer", host_buffer)
    caplog.set_level("INFO", logger="lowvram_stepvideo.engines.streaming")
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


# ---------------------------------------------------------------- what detach gives back

@pytest.mark.parametrize("source,budget_blocks", [("ram", 100), ("ram", 2.5), ("disk", 0)])
@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "fake-cuda"])
def test_kept_model_gets_its_mapped_tensors_back(toy_dir, fake_cuda, source, budget_blocks, cuda):
    """Loaded in the file's dtype, every weight is a view of the memory map; after a keep-detach each block tensor
    is that very view again (same storage pointer), resident, packed, pageable or disk alike: no copies."""
    model = load_toy(toy_dir, DIM, N, torch.bfloat16)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    block = BlockLayout(model.transformer_blocks[0]).nbytes
    engine = BlockStreamer(model.transformer_blocks, "cpu", resident=2, prefetch=1, source=source,
                           pin_budget_bytes=int(budget_blocks * block), weight_refs=model.weight_refs,
                           prefix="transformer_blocks.")
    engine.cuda = cuda
    engine.attach()
    with torch.inference_mode():
        model(torch.randn(2, DIM, dtype=torch.bfloat16))
    engine.detach()
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_discard_leaves_the_model_empty(toy_dir):
    model = load_toy(toy_dir, DIM, N, torch.bfloat16)
    engine = attach_streaming(model, "cpu", resident=2, prefetch=1, pin_budget_bytes=2**30)
    with torch.inference_mode():
        model(torch.randn(2, DIM, dtype=torch.bfloat16))
    offload_component(model, discard=True)
    assert all(t.numel() == 0 and t.device.type == "cpu" for t in model.state_dict().values())
    assert engine.store is None and engine._slots == [] and engine.footprint() == Footprint(0, 0)
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.modules())


# ---------------------------------------------------------------- no host RAM spike at detach

# Peak RSS across one detach: reset the high-water mark (5 > clear_refs) just before it, read VmHWM after.
DETACH_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_offload import load_toy
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component

def status_bytes(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")

def across_detach(dtype, discard):
    model = load_toy({folder!r}, {dim}, {n}, dtype)
    before_attach = reset_peak()
    attach_streaming(model, "cpu", prefetch=1, source="ram", pin_budget_bytes=2**40, arena_bytes={arena})
    with torch.inference_mode():
        model(torch.randn(1, 4, {dim}, dtype=dtype))
    attached = status_bytes("VmRSS") - before_attach
    before = reset_peak()
    offload_component(model, discard=discard)
    spike = status_bytes("VmHWM") - before
    with torch.inference_mode():
        ok = discard or bool(torch.isfinite(model(torch.randn(1, 4, {dim}, dtype=dtype))).all())
    return {{"attached": attached, "spike": spike, "ok": ok}}

out = {{"discard": across_detach(torch.float32, True),      # file float32, run float32: mapped originals
       "keep_mapped": across_detach(torch.float32, False),
       "keep_cast": across_detach(torch.bfloat16, False)}}   # file float32, run bf16: originals were copies
print(json.dumps(out))
"""


@pytest.mark.slow
def test_detach_has_no_host_ram_spike(tmp_path):
    """Packed arenas of a 200 MB stack: giving the weights back (or dropping them) must not hold the stack twice
    (the old detach rebuilt a copy of every packed block while the arenas were still allocated)."""
    dim, n, arena = 512, 48, 32 * 2**20
    folder = write_toy(tmp_path / "big", dim, n, dtype=torch.float32, random=False)
    size = (folder / "model.safetensors").stat().st_size
    code = DETACH_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(folder), dim=dim, n=n, arena=arena)
    # a fixed mmap threshold: freed buffers go back to the OS at once, as the 256 MiB arenas of a real run do
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    print({"stack_bytes": size, **result})
    assert result["discard"]["attached"] > 0.8 * size             # the measure sees the packed images
    assert result["discard"]["spike"] < 0.05 * size
    assert result["keep_mapped"]["spike"] < 0.05 * size and result["keep_mapped"]["ok"]
    block = size // n                                            # the cast copies are rebuilt as arenas go
    assert result["keep_cast"]["spike"] < arena + 2 * block and result["keep_cast"]["ok"]
