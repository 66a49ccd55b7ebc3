"""The work of a run, for the time estimate: floating-point operations per phase, counted by running each planned
network (planned_models.py: data-free, on "meta") under torch's FlopCounterMode at the run's shapes.

Stacks are built with one and with two blocks; a block's count is the difference, and a stack of N blocks counts the
one-block network plus N-1 blocks (identical blocks do identical work). The DiT's attention runs on a stand-in that
counts 4 B H Sq Sk D (QK^T and PV) and computes nothing; its linears are counted by the mode. The VAE decodes one
chunk per tile shape (tiles of a frame are all one size, engines/tiling.py), counted once and multiplied by the tiles
and time chunks of the run. Counts are kept for the process and on disk (cache_home()/work, like the plan cache:
keyed by the folder's identity, what was counted and the code's version), so a dry-run counts once per size.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..engines.tiling import check_tiling, tile_spans
from ..files.caches import cache_home
from ..files.configs import ClipConfig, StepLLMConfig
from ..loading.model_folder import ModelFolder
from ..pipeline.sampling import latent_shape
from .byte_count import PlanningAccountant
from .plan_cache import PlanCache, folder_identity
from .planned_models import planned_model

DEVICE = torch.device("meta", 0)
PROMPTS = 2                     # the prompt and the negative prompt, encoded and denoised together
LATENTS_PER_CHUNK = 3           # the VAE decodes 3 latents at a time


@dataclass(frozen=True)
class Work:
    """Operations of one phase: `linear` (matmuls of the weights, convolutions), `attention` (QK^T and PV of the
    DiT's attention, 4 B H Sq Sk D) and `head_dim` (to turn attention operations into score elements)."""
    linear: float = 0.0
    attention: float = 0.0
    head_dim: int = 128

    def __add__(self, other: "Work") -> "Work":
        return Work(self.linear + other.linear, self.attention + other.attention, self.head_dim)

    def __mul__(self, n: float) -> "Work":
        return Work(self.linear * n, self.attention * n, self.head_dim)


class _AttentionCounter:
    """A stand-in `attend`: adds 4 B H Sq Sk D to `ops` and returns a tensor of the output's shape."""

    def __init__(self):
        self.ops = 0.0

    def __call__(self, q, k, v, mask=None):
        b, sq, h, d = q.shape
        self.ops += 4.0 * b * h * sq * k.shape[1] * d
        return torch.empty_like(q)


def _counted(folder: ModelFolder, component: str, dtype: torch.dtype, blocks: int, run) -> Work:
    """Operations of `run(model)` on `component` built with `blocks` blocks per stack."""
    counter = _AttentionCounter()
    accountant = PlanningAccountant()
    with accountant.untracked():
        model, _ = planned_model(folder, component, dtype, blocks, attend=counter)
    with torch.inference_mode(), accountant, FlopCounterMode(display=False) as flops:
        run(model)
    return Work(float(flops.get_total_flops()), counter.ops)


def _stack(folder: ModelFolder, component: str, dtype: torch.dtype, run) -> Work:
    """The whole stack's operations from networks of one and of two blocks."""
    config = folder.open(component, layers=0).config
    one, two = (_counted(folder, component, dtype, n, run) for n in (1, 2))
    block = Work(two.linear - one.linear, two.attention - one.attention)
    return one + block * (config.num_layers - 1)


def kept(count):
    """`count(folder, dtype, *sizes) -> Work`, kept for the process and on disk (see the module docstring)."""
    @functools.lru_cache(maxsize=64)
    def cached(folder: ModelFolder, dtype: torch.dtype, *sizes) -> Work:
        disk = PlanCache(cache_home() / "work")
        what = repr((count.__name__, folder.weight_format, folder.published, str(dtype), sizes))
        key = disk.key(folder_identity(folder.root), what)
        found = disk.get(key)
        if isinstance(found, dict) and set(found) == {"linear", "attention", "head_dim"}:
            return Work(**found)
        work = count(folder, dtype, *sizes)
        disk.put(key, asdict(work))
        return work
    cached.__name__ = count.__name__
    return cached


@kept
def text_work(folder: ModelFolder, dtype: torch.dtype) -> Work:
    """The text phase: step_llm on both prompts (padded to its 320 tokens), CLIP in float32 (77 tokens)."""
    def llm(model):
        ids = torch.zeros(PROMPTS, StepLLMConfig.max_length, dtype=torch.int64, device=DEVICE)
        model(ids, torch.ones_like(ids))

    def clip(model):
        ids = torch.zeros(PROMPTS, ClipConfig.max_length, dtype=torch.int64, device=DEVICE)
        model(ids, torch.ones_like(ids))
    return _stack(folder, "step_llm", dtype, llm) + _stack(folder, "hunyuan_clip", torch.float32, clip)


@kept
def dit_forward_work(folder: ModelFolder, dtype: torch.dtype, frames: int, height: int, width: int) -> Work:
    """One DiT forward of one prompt at the run's size (a guided step runs two: PROMPTS)."""
    config = folder.open("transformer", layers=0).config
    shape = latent_shape(frames, height, width, channels=config.in_channels).shape
    text = StepLLMConfig.max_length

    def forward(model):
        x = torch.zeros(shape, dtype=dtype, device=DEVICE)
        t = torch.zeros(1, dtype=dtype, device=DEVICE)
        y = torch.zeros(1, text, config.caption_channels[0], dtype=dtype, device=DEVICE)
        clip = torch.zeros(1, ClipConfig.max_length, config.caption_channels[1], dtype=dtype, device=DEVICE)
        mask = torch.ones(1, ClipConfig.max_length + text, dtype=dtype, device=DEVICE)
        ti2v = (torch.zeros_like(x), torch.zeros(1, dtype=dtype, device=DEVICE)) if config.kind == "ti2v" else ()
        model(x, t, y, clip, mask, *ti2v)    # TI2V: condition latents and motion score
    work = _stack(folder, "transformer", dtype, forward)
    return Work(work.linear, work.attention, config.head_dim)


@kept
def decode_work(folder: ModelFolder, dtype: torch.dtype, frames: int, height: int, width: int, tile: int,
                overlap: int) -> Work:
    """The decode: every time chunk of up to 3 latents, tiled as the profile says (tile 0 = untiled)."""
    _, num_latents, channels, h, w = latent_shape(frames, height, width, channels=_vae_channels(folder)).shape
    tiles, overlaps = check_tiling(tile or max(h, w), overlap if tile else 0, (h, w))
    spans = [tile_spans(n, t, o) for n, t, o in zip((h, w), tiles, overlaps)]
    tile_hw = (spans[0][0][1] - spans[0][0][0], spans[1][0][1] - spans[1][0][0])
    per_frame = len(spans[0]) * len(spans[1])
    sizes = [min(LATENTS_PER_CHUNK, num_latents - s) for s in range(0, num_latents, LATENTS_PER_CHUNK)]
    total = 0.0
    for k in set(sizes):
        def chunk(model, k=k):
            model.decode_chunk(torch.zeros(1, k, channels, *tile_hw, dtype=dtype, device=DEVICE))
        total += _counted(folder, "vae", dtype, 1, chunk).linear * per_frame * sizes.count(k)
    return Work(total, 0.0)


def _vae_channels(folder: ModelFolder) -> int:
    return folder.open("vae").config.z_channels
