"""Block streaming (lowvram_stepvideo.engines.streaming) against the plain resident model: toy stacks, the fixture DiT and
step_llm, quantized blocks; transfer order and bounds from the engine's log; bounded RSS in disk mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lowvram_stepvideo.files.weights import CheckpointError, open_weights
from lowvram_stepvideo.loading.assign import build_on_meta, load_weights
from lowvram_stepvideo.engines.placement import (
    attach_streaming,
    device_memory_report,
    find_blocks,
    offload_component,
    to_device)
from lowvram_stepvideo.engines.streaming import BlockStreamer
from lowvram_stepvideo.engines.host_store import BlockLayout, pread_into

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


SETTINGS = [(0, 0), (0, 1), (0, 2), (1, 1), (2, 0), (2, 3), (0, 9), (7, 1)]   # (resident, prefetch)


# ---------------------------------------------------------------- toy stack saved and loaded like a release

class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim, bias=False)
        self.fail = False            # set by a test to make this block raise

    def forward(self, x):
        if self.fail:
            raise RuntimeError("toy block failure")
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ToyModel(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(ToyBlock(dim) for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.transformer_blocks:
            x = block(x)
        return x


def write_toy(folder: Path, dim: int, n: int, dtype=torch.bfloat16, seed: int = 0, random: bool = True) -> Path:
    """A toy checkpoint as `folder/model.safetensors`: random weights in `dtype` (or a cheap fixed pattern)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in ToyModel(dim, n).state_dict().items()}
    if random:
        tensors = {k: (torch.randn(s, generator=gen) / s[-1] ** 0.5 + 0.1).to(dtype) for k, s in shapes.items()}
    else:
        tensors = {k: torch.full(s, 1.0 / s[-1], dtype=dtype) for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def load_toy(folder: Path, dim: int, n: int, dtype) -> ToyModel:
    model = build_on_meta(lambda: ToyModel(dim, n))
    return load_weights(model, open_weights(folder, ("model",)), dtype)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), dim=32, n=7)


def _run(model, *inputs):
    with torch.inference_mode():
        return model(*inputs)


def _check_streamed_equals_plain(model, inputs, device="cpu", plain=None, repeats=2, **settings):
    """Streamed output == plain output exactly, for `repeats` forwards; detach restores the plain model."""
    plain = _run(model, *inputs) if plain is None else plain
    params_before = {k: v.data_ptr() for k, v in model.named_parameters()}
    engine = attach_streaming(model, device, **settings)
    dev_inputs = [x.to(device) for x in inputs]
    for _ in range(repeats):
        assert torch.equal(_run(model, *dev_inputs).cpu(), plain)
    offload_component(model)
    assert all(p.device.type == "cpu" and p.numel() > 0 for p in model.parameters())
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.modules())
    prefix = find_blocks(model)[0] + "."
    outside = [k for k in params_before if not k.startswith(prefix)]   # the CPU "device" kept the very tensors
    assert all(params_before[k] == model.get_parameter(k).data_ptr() for k in outside) or device != "cpu"
    if repeats > 1:
        assert torch.equal(_run(model, *inputs), plain)
    return engine


# ---------------------------------------------------------------- toy: equality

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("source", ["ram", "disk"])
@pytest.mark.parametrize("resident,prefetch", SETTINGS)
def test_toy_streamed_equals_resident(toy_dir, dtype, source, resident, prefetch):
    model = load_toy(toy_dir, 32, 7, dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    engine = _check_streamed_equals_plain(model, [x], resident=resident, prefetch=prefetch, source=source)
    streamed = 7 - min(resident, 7)
    assert engine.stats.resident_blocks == min(resident, 7)
    assert engine.stats.slots == min(prefetch + 1, streamed)
    assert engine.stats.forwards == 2


@pytest.mark.parametrize("budget_blocks,pinned", [(0, 0), (2.5, 2), (100, 6)])
def test_pin_budget_splits_pinned_and_pageable(toy_dir, budget_blocks, pinned, caplog):
    caplog.set_level("INFO", logger="lowvram_stepvideo.engines.streaming")
    model = load_toy(toy_dir, 32, 7, torch.bfloat16)
    slot_bytes = BlockLayout(model.transformer_blocks[0]).nbytes
    budget = int(budget_blocks * slot_bytes)
    # 512-byte arenas: block images straddle arena boundaries, and rounding waste stays below one block
    engine = _check_streamed_equals_plain(model, [torch.randn(3, 32, dtype=torch.bfloat16)], resident=1,
                                          prefetch=1, pin_budget_bytes=budget, arena_bytes=512)
    s = engine.stats
    assert (s.packed_blocks, s.pageable_blocks, s.disk_blocks) == (pinned, 6 - pinned, 0)
    assert s.packed_bytes <= budget and s.pin_budget_bytes == budget and not s.page_locked
    assert f"{pinned} packed in host RAM" in engine.summary()
    assert engine.summary() in caplog.text                  # the same line is logged at attach


def test_disk_mode_packs_nothing_whatever_the_budget(toy_dir):
    """The packed budget is for source "ram": a disk-streamed stack (step_llm's single pass) holds no images."""
    model = load_toy(toy_dir, 32, 7, torch.bfloat16)
    engine = _check_streamed_equals_plain(model, [torch.randn(4, 32, dtype=torch.bfloat16)], source="disk",
                                          pin_budget_bytes=3 * 2**20, prefetch=2)
    assert (engine.stats.packed_blocks, engine.stats.disk_blocks, engine.stats.packed_bytes) == (0, 7, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_every_source_gives_the_same_block_image(toy_dir, dtype):
    """Packed RAM, pageable RAM and the file (cast or not) put the same tensors in a slot image (padding bytes
    between tensors are left unspecified)."""
    images = []
    for source, budget in [("ram", 2**30), ("ram", 0), ("disk", 0)]:
        model = load_toy(toy_dir, 32, 7, dtype)
        engine = BlockStreamer(model.transformer_blocks, "cpu", source=source, pin_budget_bytes=budget,
                               weight_refs=model.weight_refs, prefix="transformer_blocks.").attach()
        image = torch.zeros(engine.stats.slot_bytes, dtype=torch.uint8)
        engine.read_block_into(5, image)
        images.append(image)
        engine.detach()
    block = load_toy(toy_dir, 32, 7, dtype).transformer_blocks[5]
    layout = BlockLayout(block)
    for image in images:
        assert all(torch.equal(v, t) for v, (_, t) in zip(layout.views(image), block.named_parameters()))


class _FakeEvent:
    def __init__(self):
        self.recorded = 0

    def record(self, stream=None):
        self.recorded += 1

    def synchronize(self):
        pass


class _FakeStream:
    def __init__(self, name: str, waits: list):
        self.name, self.waits = name, waits

    def wait_event(self, event):
        self.waits.append((self.name, event.recorded))


@pytest.fixture
def fake_cuda(monkeypatch):
    """The engine's CUDA branch (copy stream, events, pinned staging, worker thread) on CPU tensors: streams and
    events become recorders, "page-locked" buffers plain RAM. Copies on CPU are synchronous, so results stay exact
    and the order of stream waits can be checked."""
    import contextlib

    from lowvram_stepvideo.engines import host_store
    waits = []
    compute = _FakeStream("compute", waits)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("copy", waits))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(host_store, "host_buffer", lambda n, pin: torch.empty(n, dtype=torch.uint8))
    return waits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("source,budget", [("ram", 2**30), ("ram", 0), ("ram", 40000), ("disk", 40000)])
def test_cuda_branch_with_fake_streams(toy_dir, fake_cuda, source, budget, dtype):
    model = load_toy(toy_dir, 32, 7, dtype)
    x = torch.randn(3, 32, dtype=dtype)
    plain = _run(model, x)
    engine = BlockStreamer(model.transformer_blocks, "cpu", resident=1, prefetch=2, source=source,
                           pin_budget_bytes=budget, weight_refs=model.weight_refs, prefix="transformer_blocks.",
                           staging_bytes=3000, staging_buffers=2, keep_log=True)
    engine.cuda = True                   # take every CUDA code path with the fakes above
    engine.attach()
    assert engine.stats.page_locked == (engine.stats.packed_blocks > 0)
    assert (engine._worker is None) == (engine.stats.packed_blocks == 6)
    for _ in range(3):
        assert torch.equal(_run(model, x), plain)
    engine.detach()
    assert torch.equal(_run(model, x), plain)
    compute = [recorded for name, recorded in fake_cuda if name == "compute"]
    copies = [recorded for name, recorded in fake_cuda if name == "copy"]
    assert len(compute) == sum(e == "bind" for e, _, _ in engine.log)      # each forward waits for its slot's fill
    assert all(recorded > 0 for recorded in compute)                       # ...which was recorded first
    assert len(copies) == engine.stats.blocks_fetched                      # each fill waits until its slot is free
    assert copies[:3] == [0, 0, 0] and all(r > 0 for r in copies[3:])     # after the first use of each slot


# ---------------------------------------------------------------- toy: transfer order and bounds

def _fetches_per_forward(log):
    out = {}
    for event, fwd, block in log:
        if event == "fetch":
            out.setdefault(fwd, []).append(block)
    return out


def _replay_slots(log, slots: int) -> None:
    """Replay fetch/evict/bind/release: a block is bound only while its bytes sit in a slot, one at a time, and
    the slots never hold more than `slots` blocks."""
    in_slots, bound = set(), None
    for event, _, block in log:
        if event == "fetch":
            in_slots.add(block)
        elif event == "evict":
            in_slots.remove(block)
        elif event == "bind":
            assert block in in_slots and bound is None
            bound = block
        else:
            bound = None
        assert len(in_slots) <= slots


@pytest.mark.parametrize("source", ["ram", "disk"])
@pytest.mark.parametrize("resident,prefetch", [(0, 0), (0, 1), (2, 1), (1, 3)])
def test_transfer_log_order_and_bounds(toy_dir, source, resident, prefetch):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    engine = attach_streaming(model, "cpu", resident=resident, prefetch=prefetch, source=source, keep_log=True)
    streamed = [i for i in range(7) if i not in engine.resident]
    materialised = []   # blocks whose weights are real tensors, seen from each block's forward
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda m, a: materialised.append(
            sum(all(p.numel() > 0 for p in b.parameters()) for b in model.transformer_blocks)))
    x = torch.randn(2, 3, 32)
    for _ in range(3):
        _run(model, x)
    fetches = _fetches_per_forward(engine.log)
    assert fetches[1] == streamed
    for fwd in (2, 3):   # at most once, in order; a block may still sit in a slot from the forward before
        assert fetches[fwd] == [b for b in streamed if b in fetches[fwd]]
        if len(streamed) >= 2 * (prefetch + 1):
            assert fetches[fwd] == streamed
    binds = [b for e, f, b in engine.log if e == "bind"]
    assert binds == streamed * 3
    _replay_slots(engine.log, prefetch + 1)
    assert max(materialised) == resident + 1 and engine.stats.peak_slots_in_use <= prefetch + 1
    for a, b in zip(streamed, streamed[1:]):   # block b was requested before block a computed
        log = engine.log
        assert log.index(("fetch", 1, b)) < log.index(("bind", 1, a)) or prefetch == 0
    offload_component(model)


def test_small_stack_stays_in_slots(toy_dir):
    """When every streamed block fits the slots, nothing is copied again after the first forward."""
    model = load_toy(toy_dir, 32, 7, torch.float32)
    x = torch.randn(2, 32)
    plain = _run(model, x)
    engine = attach_streaming(model, "cpu", resident=4, prefetch=2, keep_log=True)
    assert all(torch.equal(_run(model, x), plain) for _ in range(3))
    assert sorted(engine.resident) == [0, 1, 3, 5]
    assert _fetches_per_forward(engine.log) == {1: [2, 4, 6]}
    offload_component(model)


def test_cyclic_prefetches_next_forward(toy_dir):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    engine = attach_streaming(model, "cpu", prefetch=2, cyclic=True, keep_log=True)
    x = torch.randn(3, 32)
    plain = _run(load_toy(toy_dir, 32, 7, torch.float32), x)
    assert torch.equal(_run(model, x), plain) and torch.equal(_run(model, x), plain)
    fetched = [b for e, f, b in engine.log if e == "fetch"]
    assert fetched == (list(range(7)) * 3)[:7 * 2 + 2]   # blocks 0, 1 of a third forward are already on their way
    assert _fetches_per_forward(engine.log)[1] == list(range(7)) + [0, 1]
    offload_component(model)


def test_block_failure_then_next_forward_is_correct(toy_dir):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    x = torch.randn(2, 32)
    plain = _run(model, x)
    attach_streaming(model, "cpu", prefetch=1, source="disk")
    model.transformer_blocks[3].fail = True
    with pytest.raises(RuntimeError, match="toy block failure"):
        _run(model, x)
    model.transformer_blocks[3].fail = False
    assert torch.equal(_run(model, x), plain)
    offload_component(model)


def test_setting_errors(toy_dir, tmp_path):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    with pytest.raises(ValueError, match="unknown offload source"):
        attach_streaming(model, "cpu", source="pinned")
    with pytest.raises(ValueError, match="prefetch"):
        attach_streaming(model, "cpu", prefetch=-1)
    plain = ToyModel(8, 3)   # no weight_refs: disk streaming is impossible
    with pytest.raises(ValueError, match="weight_refs"):
        attach_streaming(plain, "cpu", source="disk")
    mixed = nn.ModuleList([ToyBlock(8), ToyBlock(8), ToyBlock(16)])
    with pytest.raises(ValueError, match="block 2 differs from block 0"):
        BlockStreamer(mixed, "cpu").attach()
    with pytest.raises(ValueError, match="no block list"):
        attach_streaming(nn.Linear(2, 2), "cpu")
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 10)
    fd = os.open(short, os.O_RDONLY)
    with pytest.raises(CheckpointError, match="truncated"):
        pread_into(fd, torch.empty(16, dtype=torch.uint8), 0, short)
    os.close(fd)


def test_resident_blocks_are_spread_and_explicit(toy_dir):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    assert sorted(BlockStreamer(model.transformer_blocks, "cpu", resident=3).resident) == [0, 2, 4]
    engine = _check_streamed_equals_plain(model, [torch.randn(2, 32)], resident=[6, 5], keep_log=True)
    assert _fetches_per_forward(engine.log)[1] == [0, 1, 2, 3, 4]


def test_phase_helpers_on_cpu(toy_dir):
    model = load_toy(toy_dir, 32, 7, torch.float32)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    to_device(model, "cpu")
    offload_component(model)
    assert before == {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert device_memory_report("cpu") == "cpu: device memory n/a"


# ---------------------------------------------------------------- disk mode keeps RSS bounded

# Peak RSS of the streaming alone: reset the high-water mark (writing 5 to clear_refs), then read VmHWM.
# getrusage's ru_maxrss would not do: it also keeps the peak of the pytest process this one was forked from.
RSS_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_offload import load_toy
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component

def status_bytes(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

def growth(source, budget):
    model = load_toy({folder!r}, {dim}, {n}, torch.float32)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_bytes("VmRSS")
    attach_streaming(model, "cpu", prefetch=1, source=source, pin_budget_bytes=budget)
    with torch.inference_mode():
        model(torch.randn(1, 4, {dim})), model(torch.randn(1, 4, {dim}))
    offload_component(model)
    return status_bytes("VmHWM") - before

# disk first (nothing packed), then the control: every block packed in RAM must show up in the measure
print(json.dumps({{"disk": growth("disk", 0), "ram": growth("ram", 2**40)}}))
"""


@pytest.mark.slow
def test_disk_mode_rss_stays_bounded(tmp_path):
    """Slow: a subprocess's memory measured around a 200 MB model written for it (smaller, and the growth would
    drown in the process's own noise); the quick run keeps test_disk_mode_packs_nothing_whatever_the_budget."""
    dim, n = 512, 48                              # 48 blocks x 4.2 MB float32 = 201 MB on disk
    folder = write_toy(tmp_path / "big", dim, n, dtype=torch.float32, random=False)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 190e6
    code = RSS_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(folder), dim=dim, n=n)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = json.loads(done.stdout.splitlines()[-1])
    print({"model_bytes": size, "rss_growth": growth})
    assert growth["disk"] < 0.2 * size
    assert growth["ram"] > 0.8 * size


# ---------------------------------------------------------------- fixture models

def _long_copy(fixture_dir, tmp_path, component, stem, layer_key, layers):
    """The fixture checkpoint with its blocks repeated to `layers` blocks (more streaming steps than 2)."""
    src = fixture_dir / "model_dir" / component
    out = tmp_path / component
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["num_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    source = open_weights(src, (stem,))
    tensors = {}
    for key in source.keys():
        parts = key.split(".")
        depth = layer_key.count(".") + 1
        if ".".join(parts[:depth]) != layer_key:
            tensors[key] = source.tensor(key).clone()
            continue
        for i in range(int(parts[depth]), layers, 2):   # block i gets fixture block i % 2
            tensors[".".join(parts[:depth] + [str(i)] + parts[depth + 1:])] = source.tensor(key).clone()
    save_file(tensors, str(out / f"{stem}.safetensors"))
    return out


DIT_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2",
              "encoder_attention_mask")


def _dit_inputs(fixture_dir, dtype):
    from conftest import read_io
    t, _ = read_io(fixture_dir / "dit_io.safetensors")
    return [t[f"in.{k}"].to(dtype) for k in DIT_INPUTS]


FIXTURE_SETTINGS = [("ram", 0, 0), ("disk", 1, 2), ("ram", 2, 1)]   # (source, resident, prefetch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fixture_dit_streamed_equals_resident(fixture_dir, tmp_path, dtype):
    from lowvram_stepvideo.loading.loaders import load_dit
    inputs = _dit_inputs(fixture_dir, dtype)
    folder = _long_copy(fixture_dir, tmp_path, "transformer", "diffusion_pytorch_model", "transformer_blocks", 5)
    plain = _run(load_dit(folder, dtype), *inputs)
    for source, resident, prefetch in FIXTURE_SETTINGS:
        _check_streamed_equals_plain(load_dit(folder, dtype), inputs, plain=plain, repeats=1, source=source,
                                     resident=resident, prefetch=prefetch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fixture_step_llm_streamed_equals_resident(fixture_dir, tmp_path, dtype):
    from conftest import read_io
    from lowvram_stepvideo.loading.loaders import load_step_llm
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    inputs = [io["in.step_llm.input_ids"]]
    folder = _long_copy(fixture_dir, tmp_path, "step_llm", "model", "transformer.layers", 5)
    plain = _run(load_step_llm(folder, dtype), *inputs)
    for source, resident, prefetch in FIXTURE_SETTINGS:
        _check_streamed_equals_plain(load_step_llm(folder, dtype), inputs, plain=plain, repeats=1, source=source,
                                     resident=resident, prefetch=prefetch)


# ---------------------------------------------------------------- quantized blocks (int8 / fp8 codes + float32 scales)

@pytest.fixture(scope="module", params=["int8", "fp8"])
def quantized_dir(request, tmp_path_factory):
    from conftest import fixture_dirs
    from lowvram_stepvideo.tools.quantize_folder import quantize_folder
    out = tmp_path_factory.mktemp("quant") / request.param
    quantize_folder(fixture_dirs()[0] / "model_dir", out, request.param, components=("transformer", "step_llm"),
                    log=lambda message: None)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_quantized_folder_streamed_equals_resident(quantized_dir, fixture_dir, dtype):
    from conftest import read_io
    from lowvram_stepvideo.loading.loaders import load_dit, load_step_llm
    from lowvram_stepvideo.models.quant import QuantLinear
    dit_inputs = _dit_inputs(fixture_dir, dtype)
    model = load_dit(quantized_dir / "transformer", dtype)
    assert isinstance(model.transformer_blocks[0].attn1.wqkv, QuantLinear)
    plain = _run(model, *dit_inputs)
    for source, resident, prefetch in [("disk", 0, 0), ("ram", 0, 1), ("disk", 1, 0)]:
        _check_streamed_equals_plain(load_dit(quantized_dir / "transformer", dtype), dit_inputs, plain=plain,
                                     repeats=2, source=source, resident=resident, prefetch=prefetch)
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    ids = [io["in.step_llm.input_ids"]]
    for source in ("disk", "ram"):
        _check_streamed_equals_plain(load_step_llm(quantized_dir / "step_llm", dtype), ids, source=source,
                                     prefetch=0)


def test_quantized_in_memory_streamed_equals_resident(fixture_dir, tmp_path):
    """Blocks quantized after loading (quantize_model): pinned streaming works; their weight_refs describe the
    float file, so disk streaming refuses instead of casting float bytes into codes."""
    from lowvram_stepvideo.models import quant
    from lowvram_stepvideo.loading.loaders import load_dit
    folder = _long_copy(fixture_dir, tmp_path, "transformer", "diffusion_pytorch_model", "transformer_blocks", 5)
    inputs = _dit_inputs(fixture_dir, torch.bfloat16)

    def quantized():
        model = load_dit(folder, torch.bfloat16)
        names = [k for k, _ in model.named_parameters()]
        return quant.quantize_model(model, quant.get_format("int8"), quant.plan_quantization("transformer", names))

    plain = _run(quantized(), *inputs)
    for resident, prefetch in [(0, 1), (2, 2)]:
        _check_streamed_equals_plain(quantized(), inputs, plain=plain, repeats=1, resident=resident,
                                     prefetch=prefetch)
    with pytest.raises(ValueError, match="cannot be streamed from disk"):
        attach_streaming(quantized(), "cpu", source="disk")


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("source,budget", [("ram", None), ("ram", 0), ("disk", 0), ("disk", 2**20)])
@pytest.mark.parametrize("resident,prefetch", [(0, 0), (0, 1), (2, 2)])
def test_gpu_streamed_equals_resident(toy_dir, source, budget, resident, prefetch):
    model = load_toy(toy_dir, 32, 7, torch.bfloat16)
    x = torch.randn(4, 9, 32, dtype=torch.bfloat16)
    to_device(model, "cuda")
    plain = _run(model, x.cuda()).cpu()
    offload_component(model)
    engine = attach_streaming(model, "cuda", resident=resident, prefetch=prefetch, source=source,
                              pin_budget_bytes=budget, staging_bytes=4096, keep_log=True)
    for _ in range(3):
        assert torch.equal(_run(model, x.cuda()).cpu(), plain)
    assert engine.stats.page_locked == (engine.stats.packed_blocks > 0)
    offload_component(model)


@pytest.mark.gpu
@gpu
def test_gpu_peak_memory_is_bounded(tmp_path):
    dim, n = 1024, 16                                          # 16 blocks x 8.4 MB (bf16)
    model = load_toy(write_toy(tmp_path / "m", dim, n, torch.bfloat16), dim, n, torch.bfloat16)
    x = torch.randn(1, 64, dim, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    engine = attach_streaming(model, "cuda", resident=2, prefetch=1)
    torch.cuda.reset_peak_memory_stats()
    _run(model, x)
    peak = torch.cuda.max_memory_allocated() - base
    block = engine.stats.slot_bytes
    assert peak < (2 + 2 + 1) * block + 8 * 2**20   # resident + slots + top level, far below 16 blocks
    offload_component(model)


@pytest.mark.gpu
@gpu
def test_gpu_fixture_dit_streamed_equals_resident(fixture_dir, tmp_path):
    from lowvram_stepvideo.loading.loaders import load_dit
    folder = _long_copy(fixture_dir, tmp_path, "transformer", "diffusion_pytorch_model", "transformer_blocks", 5)
    inputs = [x.cuda() for x in _dit_inputs(fixture_dir, torch.bfloat16)]
    model = load_dit(folder, torch.bfloat16)
    to_device(model, "cuda")
    plain = _run(model, *inputs).cpu()
    offload_component(model)
    for source, resident, prefetch in FIXTURE_SETTINGS:
        model = load_dit(folder, torch.bfloat16)
        attach_streaming(model, "cuda", resident=resident, prefetch=prefetch, source=source, cyclic=True)
        for _ in range(2):
            assert torch.equal(_run(model, *inputs).cpu(), plain)
        offload_component(model)
