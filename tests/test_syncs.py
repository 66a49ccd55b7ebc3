"""No host sync in a denoising step but the NaN check (issue 17, point 5), counted on the CPU.

`HostReads` (a TorchFunctionMode) counts, in each denoising step of the tiny demo pipeline, what makes the host
wait for the device on a GPU: tensor data turned into Python (`.item()`, `bool()`, `float()`, `int()`,
`.tolist()`, `.cpu()`, `.numpy()`), ops whose output size depends on the data (`nonzero`, `masked_select`,
boolean indexing: flash-attn's masked cross-attention did that per batch row, in every block, at every call) and
moves of a tensor to a device named in the call (from pageable host memory, a copy the host waits for: the
timestep used to be copied at every DiT call).

The number it holds: 1 read and 0 moves per step (T2V and TI2V, CFG as a batch or one branch after the other,
SDPA or a flash-style kernel that takes no mask, the DiT resident or streamed, the step cache on or off). The one
read is the job's check that the step's latents are finite, or, in a step where the step cache decides whether to
reuse (it must know before block 1 runs or is fetched), that decision, which carries the previous step's check
with it (pipeline/step_reads.py); the step cache decides once per step, for all its CFG branches.
What a phase does once (the key masks' lengths, the staged schedule) is outside the steps and not counted.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lowvram_stepvideo.defaults import SpeedOptions
from lowvram_stepvideo.engines import attention, levers
from lowvram_stepvideo.models.layers import sdpa
from lowvram_stepvideo.pipeline import phases
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.pipeline.sampling import flow_sigmas, initial_noise, latent_shape
from lowvram_stepvideo.profiles import load_profile
from lowvram_stepvideo.run.resume import NonFiniteLatents, non_finite_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 5
READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "is_nonzero",
         "nonzero", "masked_select", "unique"}
NAN_CHECKS = 1
# per step, with max_reuse 2 and a threshold every change is under: step 0 (first) runs in full and saves the
# residuals, steps 1 and 2 decide (and reuse), step 3 is past the cap, step 4 is the last
CACHE_DECISIONS = [0, 1, 1, 0, 0]


def _named_device(args, kwargs) -> bool:
    return isinstance(kwargs.get("device"), (torch.device, str)) or \
        any(isinstance(a, torch.device) or (isinstance(a, str) and a != "") for a in args)


class HostReads(TorchFunctionMode):
    """Host reads and device moves, each with where it happened; `mark()` closes a step."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.moves: list[str] = []
        self.marks: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in READS or (name in ("__getitem__", "__setitem__") and _bool_index(args[1])):
            self.reads.append(name)
        elif (name in ("to", "cuda") and _named_device(args[1:], kwargs)) or \
                (name in ("as_tensor", "tensor") and args and not isinstance(args[0], torch.Tensor)
                 and "device" in kwargs):
            self.moves.append(name)
        return func(*args, **kwargs)

    def mark(self) -> None:
        self.marks.append((len(self.reads), len(self.moves)))


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class Steps:
    """Reads and moves per denoising step: from the levers' start_step to the end of the step's callback."""

    def __init__(self, mode: HostReads):
        self.mode, self.starts, self.ends = mode, [], []

    def per_step(self) -> tuple[list[int], list[int], list[int]]:
        starts, ends = self.starts, self.ends
        assert len(starts) == len(ends) == STEPS
        reads = [e[0] - s[0] for s, e in zip(starts, ends)]
        moves = [e[1] - s[1] for s, e in zip(starts, ends)]
        between = [s[0] - e[0] + s[1] - e[1] for e, s in zip(ends, starts[1:])]   # loop overhead
        return reads, moves, between


@pytest.fixture(scope="module")
def pipes(demo_cache, ti2v_demo_dir):
    """Per kind: the demo folder and its prompt embeddings (the text phase runs once)."""
    from lowvram_stepvideo.loading import demo
    out = {}
    for kind, folder in (("t2v", demo_cache / f"demo-v{demo.DEMO_VERSION}"), ("ti2v", ti2v_demo_dir)):
        pipe = PhasePipeline.open(folder, "cpu", progress=False, log=lambda msg: None)
        out[kind] = (folder, pipe.encode_prompt("a red fox in the snow"))
    return out


@pytest.fixture
def fake_flash(monkeypatch):
    """A kernel that takes no mask, like flash-attn, on the CPU: the masked cross-attention goes through
    attention._masked_kernel (its key selection), each call then runs as SDPA."""
    calls = []

    def kernel(name, q, k, v):
        calls.append(k.shape[1])
        return sdpa(q, k, v)
    monkeypatch.setattr(attention, "is_available", lambda name: True)
    monkeypatch.setattr(attention, "_run_kernel", kernel)
    return calls


def _denoise(pipes, kind: str, monkeypatch, cfg: str = "sequential", cache: float = 0.0,
             attend: str = "sdpa", resident: int = 2, plant=None, seen: list | None = None):
    """One denoising phase of STEPS steps under HostReads, with the job's NaN check; (per-step reads, moves,
    between steps, pipeline). `seen`: the steps handed to the step callback."""
    folder, embeds = pipes[kind]
    base = load_profile("cpu")
    profile = replace(base, cfg_mode=cfg, attention=attend, dit=replace(base.dit, resident_blocks=resident))
    options = SpeedOptions(cache=cache, cache_max_reuse=2) if cache else None
    pipe = PhasePipeline.open(folder, profile, progress=False, log=lambda msg: None, options=options)
    shape = latent_shape(17, 64, 96, channels=pipe.latent_channels())
    condition = pipe.condition(shape.shape, None, torch.randn(1, 1, *shape.shape[2:]), 0) if kind == "ti2v" \
        else None
    mode = HostReads()
    steps = Steps(mode)
    start = levers.DiTLevers.start_step

    def start_step(self, step, total, read=None):
        mode.mark()
        steps.starts.append(mode.marks[-1])
        start(self, step, total, read)
    monkeypatch.setattr(levers.DiTLevers, "start_step", start_step)

    def non_finite(step: int) -> None:                   # the job's
        raise non_finite_latents(step, STEPS, None)

    def on_step(done: int, latents: torch.Tensor) -> None:
        if seen is not None:
            seen.append(done)
        if plant:
            plant(latents)
        mode.mark()
        steps.ends.append(mode.marks[-1])
    with mode:
        pipe.denoise(embeds, initial_noise(shape.shape, 0), flow_sigmas(STEPS, 7.0), 9.0, 0, on_step, condition,
                     on_non_finite=non_finite)
    reads, moves, between = steps.per_step()
    return reads, moves, between, pipe


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
@pytest.mark.parametrize("cfg", ["batch", "sequential"])
@pytest.mark.parametrize("attend", ["sdpa", "flash"])
def test_a_step_reads_the_device_once_for_the_nan_check(pipes, kind, cfg, attend, monkeypatch, request):
    if attend == "flash":
        request.getfixturevalue("fake_flash")
    reads, moves, between, _ = _denoise(pipes, kind, monkeypatch, cfg=cfg, attend=attend)
    assert reads == [NAN_CHECKS] * STEPS
    assert moves == [0] * STEPS and between == [0] * (STEPS - 1)


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
@pytest.mark.parametrize("cfg", ["batch", "sequential"])
def test_with_the_step_cache_a_step_still_reads_the_device_once(pipes, kind, cfg, monkeypatch):
    """The steps that decide read their decision and the previous step's NaN check in one read."""
    reads, moves, between, pipe = _denoise(pipes, kind, monkeypatch, cfg=cfg, cache=0.99)
    assert reads == [NAN_CHECKS] * STEPS
    assert moves == [0] * STEPS and between == [0] * (STEPS - 1)
    branches = 1 if cfg == "batch" else 2
    counts = pipe.speed["step_cache"]
    assert counts["cached"] == branches * sum(CACHE_DECISIONS)      # each decision was "reuse", for every branch


def test_a_streamed_dit_with_flash_and_the_step_cache_keeps_the_numbers(pipes, monkeypatch, fake_flash):
    reads, moves, _, _ = _denoise(pipes, "t2v", monkeypatch, cfg="batch", cache=0.99, attend="flash", resident=0)
    assert reads == [NAN_CHECKS] * STEPS and moves == [0] * STEPS
    assert fake_flash, "the masked cross-attention ran through the flash-style kernel"


@pytest.mark.parametrize("cache", [0.0, 0.99])
@pytest.mark.parametrize("cfg", ["batch", "sequential"])
def test_nan_latents_stop_the_run_naming_their_step_before_the_next_step_goes_past_block_0(pipes, cfg, cache,
                                                                                           monkeypatch):
    """The latents turn NaN in step index 1 (steps done: 2). Without the cache, its check is read at that step's
    end, before the step is handed over. With it, step 1 read its decision, so the check waits for step 2's
    decision, made after block 0: the run stops there naming step 2, and no later block of step 2 ran."""
    euler, calls = phases.euler_step, []

    def poisoned(latents, v, sigma, next_sigma):
        calls.append(1)
        out = euler(latents, v, sigma, next_sigma)
        return out * float("nan") if len(calls) == 2 else out
    monkeypatch.setattr(phases, "euler_step", poisoned)
    blocks = []
    monkeypatch.setattr(levers.DiTLevers, "attach", _counting_blocks(levers.DiTLevers.attach, blocks))
    seen = []
    with pytest.raises(NonFiniteLatents, match="NaN or infinite at step 2 of 5"):
        _denoise(pipes, "t2v", monkeypatch, cfg=cfg, cache=cache, seen=seen)
    if cache:
        assert seen == [1, 2] and blocks[-1] == 0     # step 2 was handed over (not saved: see run/job), then stopped
    else:
        assert seen == [1]


def _counting_blocks(attach, blocks: list):
    """DiTLevers.attach that also records, per DiT forward, the index of the last block run."""
    def counting(self):
        out = attach(self)
        for index, block in enumerate(self.dit.transformer_blocks):
            block.register_forward_pre_hook(
                lambda module, args, index=index: blocks.append(index) if index == 0 else blocks.__setitem__(-1, index))
        return out
    return counting


def test_the_counter_catches_a_planted_read(pipes, monkeypatch):
    reads, _, _, _ = _denoise(pipes, "t2v", monkeypatch, plant=lambda latents: latents.abs().max().item())
    assert reads == [NAN_CHECKS + 1] * STEPS


def test_the_counter_catches_boolean_key_selection(pipes, monkeypatch, fake_flash):
    """A key mask without its lengths (as every call built one before): the flash-style kernel selects each row's
    keys by boolean indexing, a read per row of every cross-attention call."""
    def plain_masks(mask, keys):
        both = phases.key_mask(mask, keys)
        return tuple(m.clone() for m in (both[0:1], both[1:2], both))   # tensors without kv_lengths
    monkeypatch.setattr(phases, "key_masks", plain_masks)
    reads, _, _, pipe = _denoise(pipes, "t2v", monkeypatch, attend="flash")
    blocks = pipe.folder.open("transformer", layers=0).config.num_layers
    assert reads == [NAN_CHECKS + 2 * blocks * 2] * STEPS   # 2 branches of one row x blocks x (k, v)


def test_the_counter_catches_a_timestep_copied_at_each_call(pipes, monkeypatch):
    staged = phases.dit_timestep
    monkeypatch.setattr(phases, "dit_timestep", lambda t, batch, dtype: staged(t.cpu(), batch, dtype).to("cpu"))
    reads, moves, _, _ = _denoise(pipes, "t2v", monkeypatch, cfg="sequential")
    assert reads == [NAN_CHECKS + 2] * STEPS and moves == [2] * STEPS


def test_key_masks_select_the_same_keys_as_the_boolean_mask(fake_flash):
    """The flash-style path over key masks built once equals the same kernel over boolean-indexed keys."""
    from lowvram_stepvideo.models.dit import cross_attention_mask, key_mask, key_mask_rows
    g = torch.Generator().manual_seed(3)
    mask = torch.cat([torch.ones(2, 77), (torch.arange(40)[None] < torch.tensor([[31], [12]])).float()], dim=1)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g) for n in (9, 117, 117))
    keep = key_mask(mask, 117)
    assert keep.kv_lengths == (108, 89) and torch.equal(keep, cross_attention_mask(mask, 117)[1])
    plain = attention.attention(q, k, v, keep.clone(), backend="flash")      # boolean indexing
    assert torch.equal(attention.attention(q, k, v, keep, backend="flash"), plain)
    assert fake_flash == [108, 89, 108, 89]
    row = key_mask_rows(keep, slice(1, 2))
    assert row.kv_lengths == (89,) and torch.equal(row, keep[1:2])


def test_a_key_mask_of_the_wrong_shape_is_refused(pipes):
    from lowvram_stepvideo.models.dit import key_mask
    folder, (y, y_mask, clip) = pipes["t2v"]
    dit = PhasePipeline.open(folder, "cpu", progress=False).folder.open("transformer").load(torch.float32, "cpu")
    keep = key_mask(y_mask.float(), y.shape[1] + clip.shape[1])
    with pytest.raises(ValueError, match="key mask"):
        dit.embed_text(y, clip, keep[:, :-1])
    enc, got = dit.embed_text(y, clip, keep)
    assert got is keep and enc.shape[:2] == keep.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not attention.is_available("flash"),
                    reason="needs a CUDA device and flash-attn")
def test_on_a_gpu_flash_over_key_masks_equals_flash_over_boolean_indexed_keys():
    """The real kernel: each row's keys sliced by its length (no sync) against the same keys gathered by boolean
    indexing; the kernel sees the same values, so the outputs are equal."""
    from lowvram_stepvideo.models.dit import key_mask
    mask = torch.cat([torch.ones(2, 77), (torch.arange(40)[None] < torch.tensor([[31], [12]])).float()], dim=1)
    q, k, v = (torch.randn(2, n, 2, 128, device="cuda", dtype=torch.bfloat16) for n in (64, 117, 117))
    keep = key_mask(mask.cuda(), 117)
    sliced = attention.attention(q, k, v, keep, backend="flash")
    indexed = attention.attention(q, k, v, keep.clone(), backend="flash")
    assert torch.equal(sliced, indexed)
