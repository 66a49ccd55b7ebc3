"""How long a planned run takes on its card: an estimate from the plan's work and the card table's throughput.

Per phase (phases run one after another, so the total is their sum):
- text: step_llm and CLIP operations at the compute dtype's rate, and step_llm's weights read once from disk; a
  streamed step_llm overlaps the two (the longer counts), one placed whole is read first, then computes (both count).
- denoise: per step, the DiT's two guided forwards (linears at the matmul kernel's rate, attention at the attention
  kernel's) and its streamed blocks (from packed RAM over PCIe, or from disk); with prefetch the copies overlap the
  compute (the longer counts), without it both count. Once per run: the weights kept on the card or packed in RAM
  are read from disk.
- decode: the VAE's operations (convolutions, its attention) at the compute dtype's rate.
A parallel run (one process's share, `layout`): each process runs 1 of the CFG x2 branches and 1/N of the tokens
and heads of a sequence split xN (its linears and attention are that share of the single run's); a sequence split
adds its all-to-alls (q, k, v and the output of every block's self-attention, (N-1)/N of each process's share)
over the card's host link (consumer cards exchange through PCIe), and the processes of one machine share its disk.
Seconds = operations / (dense peak x efficiency) and bytes / (bandwidth x efficiency). The efficiencies are
assumptions (ASSUMED) until `bench/speed_gpu.py --calibrate` measures them on the card at hand (calibration.py);
the disk's rate is an assumption. Not counted: the step cache's skipped blocks, torch.compile, writing the mp4.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch

from ..engines import attention, fast_matmul
from ..engines.cards import Card
from ..engines.target import Target
from ..loading.model_folder import ModelFolder
from ..profiles import Preset, Profile
from .calibration import ASSUMED, efficiencies, efficiency
from ..engines.attention import attention_precision, math_attention
from .planned_models import ModelShape, planned_model
from .stacks import block_layout
from ..pipeline.sampling import latent_shape
from .work import PROMPTS, Work, decode_work, dit_forward_work, text_work

DISK_GBS = 3.0                 # assumed NVMe read rate (docs: 3-7 GB/s); blocks read from disk each pass
MATH_BYTES_PER_SCORE = 18      # SDPA's math kernel: float32 scores written, read, softmax written, read; bf16 copy
DTYPE_KIND = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class Estimate:
    """Seconds per phase (None: not estimated, `notes` say why) and what they assume."""
    card: str
    preset: str                                      # FRAMESxHEIGHTxWIDTH@STEPS
    seconds: dict[str, float | None]
    attention_kernel: str
    matmul: str
    calibrated: bool
    efficiency: dict[str, float]
    notes: list[str] = field(default_factory=list)
    work: dict = field(default_factory=dict)         # operations and bytes behind the seconds

    @property
    def total(self) -> float | None:
        values = list(self.seconds.values())
        return None if not values or None in values else sum(values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = {k: None if v is None else round(v, 1) for k, v in self.seconds.items()}
        out["total_seconds"] = None if self.total is None else round(self.total, 1)
        return out


def estimate_run(folder: ModelFolder, profile: Profile, preset: Preset, card: Card | None,
                 options=None, layout=None) -> Estimate | None:
    """The estimate of `profile` (as fitted) at `preset` on `card` (engines/cards.py), run by one process or by
    `layout`'s (engines.parallel.Layout, one card each); None without a table card or on the CPU."""
    if card is None or profile.device != "cuda":
        return None
    eff, calibrated = efficiencies(card)
    rates = _Rates(card, profile, folder, eff)
    est = Estimate(card.name, f"{preset}@{preset.steps}", {}, rates.kernel, rates.matmul, calibrated, eff,
                   list(rates.notes))
    dtype = profile.torch_dtype
    est.seconds["text"] = _text_seconds(folder, profile, rates, est)
    est.seconds["denoise"] = _denoise_seconds(folder, profile, preset, rates, est, layout)
    if layout is not None:
        est.notes.append(f"{layout.describe()}, one {card.name} each")
    decode = decode_work(folder, dtype, preset.frames, preset.height, preset.width, profile.vae.tile,
                         profile.vae.overlap)
    est.work["decode_ops"] = decode.linear
    est.seconds["decode"] = rates.ops_seconds(decode.linear, "conv")
    if options is not None and getattr(options, "cache", 0):
        est.notes.append("the step cache's skipped blocks are not counted (they depend on the video)")
    return est


class _Rates:
    """The card's rates for this run: compute dtype, matmul kernel, attention kernel, links."""

    def __init__(self, card: Card, profile: Profile, folder: ModelFolder, eff: dict[str, float]):
        self.card, self.eff, self.notes = card, eff, []
        kind = DTYPE_KIND[profile.compute_dtype]
        self.dense = card.tflops(kind) * 1e12
        if not self.dense:
            self.notes.append(f"{card.name} has no {profile.compute_dtype} tensor cores (compute capability "
                              f"{card.capability_text}): it runs emulated, and is not estimated")
        fmt, _ = fast_matmul.choose(profile.matmul, folder.weight_format, "cuda", card.capability)
        self.matmul = f"{fmt} x {fmt}" if fmt else f"{profile.compute_dtype} (weight-only)"
        self.linear = card.tflops(fmt) * 1e12 if fmt else self.dense
        self.kernel = attention_kernel(profile, card)

    def ops_seconds(self, ops: float, what: str, rate: float | None = None) -> float | None:
        rate = self.dense if rate is None else rate
        return ops / (rate * self.eff[what]) if rate else None

    def attention_seconds(self, work: Work) -> float | None:
        return attention_seconds(self.card, self.kernel, work, self.eff, self.dense)

    def link_seconds(self, nbytes: float) -> float:
        return nbytes / (self.card.host_link_gbs * 1e9 * self.eff["host_link"])

    def disk_seconds(self, nbytes: float) -> float:
        return nbytes / (min(DISK_GBS, self.card.host_link_gbs * self.eff["host_link"]) * 1e9)


def attention_seconds(card: Card, kernel: str, work: Work, eff: dict[str, float], dense: float) -> float | None:
    """Seconds of the DiT's attention operations `work.attention` with `kernel` on `card` (see attention_kernel);
    `dense`: the compute dtype's peak in FLOP/s (fused kernels run at it; 0: no tensor cores, not estimated)."""
    a = work.attention
    if kernel == "sdpa (math kernel)":   # float32 matmuls on CUDA cores and the scores through memory
        scores = a / (4 * work.head_dim)
        return (a / (card.tflops("fp32") * 1e12 * eff["matmul"])
                + scores * MATH_BYTES_PER_SCORE / (card.memory_gbs * 1e9 * eff["memory"]))
    if kernel.endswith("(float16)"):   # run on float16 copies: the card's fp16 rate, whatever the compute dtype's
        dense = card.tflops("fp16") * 1e12
    if not dense:
        return None
    if kernel.startswith("sage"):   # int8 QK^T; P V in fp8 (8.9+) or fp16 with fp16 accumulate (Ampere)
        pv = card.tflops("fp8") if card.capability >= (8, 9) else card.tflops_fp16_accumulate()
        return (a / 2) / (card.tflops("int8") * 1e12 * eff["attention"]) + (a / 2) / (pv * 1e12 * eff["attention"])
    return a / (dense * eff["attention"]) if dense else None


def attention_kernel(profile: Profile, card: Card) -> str:
    """The kernel the DiT's attention runs on the card, as the run and its plan choose it
    (attention.choose_attention); "(float16)" where it runs on float16 copies (attention.attention_precision), SDPA's
    math kernel where nothing fused takes the inputs."""
    kernel, _ = attention.choose_attention(profile, Target(card.capability, card.name))
    if kernel == "sdpa" and math_attention(card.capability, profile.torch_dtype):
        return "sdpa (math kernel)"
    return f"{kernel} (float16)" if attention_precision(card.capability, profile.torch_dtype) else kernel


def _text_seconds(folder: ModelFolder, profile: Profile, rates: _Rates, est: Estimate) -> float | None:
    work = text_work(folder, profile.torch_dtype)
    weights = _shape(folder, "step_llm", profile.torch_dtype).total_bytes
    est.work.update(text_ops=work.linear, text_read_bytes=weights)
    compute = rates.ops_seconds(work.linear, "matmul")
    if compute is None:
        return None
    read = rates.disk_seconds(weights)
    streamed = profile.text_encoders.placement == "stream" and profile.text_encoders.prefetch
    return max(compute, read) if streamed else compute + read


def _denoise_seconds(folder: ModelFolder, profile: Profile, preset: Preset, rates: _Rates,
                     est: Estimate, layout=None) -> float | None:
    dtype = profile.torch_dtype
    forward = dit_forward_work(folder, dtype, preset.frames, preset.height, preset.width)
    shape = _shape(folder, "transformer", dtype)
    stack = block_layout(folder, profile)["dit"]
    prompts, split, processes = (PROMPTS // layout.cfg, layout.sequence, layout.world) if layout else (PROMPTS, 1, 1)
    passes = 1 if profile.cfg_mode == "batch" or prompts == 1 else PROMPTS   # a batch streams the blocks once
    ram_bytes, disk_bytes = stack["packed_in_ram"] * shape.block_bytes, stack["from_disk"] * shape.block_bytes
    loaded = shape.other_bytes + (stack["resident"] + stack["packed_in_ram"]) * shape.block_bytes
    exchanged = prompts * _all_to_all_bytes(folder, preset, dtype, split)
    est.work.update(dit_forward_linear_ops=forward.linear, dit_forward_attention_ops=forward.attention,
                    streamed_bytes_per_step=passes * (ram_bytes + disk_bytes), loaded_bytes=loaded)
    if layout is not None:
        est.work["exchanged_bytes_per_step"] = exchanged
    linear = rates.ops_seconds(forward.linear / split, "matmul", rates.linear)
    attend = rates.attention_seconds(Work(0.0, forward.attention / split, forward.head_dim))
    if linear is None or attend is None:
        return None
    compute = prompts * (linear + attend) + rates.link_seconds(exchanged)
    stream = passes * (rates.link_seconds(ram_bytes) + processes * rates.disk_seconds(disk_bytes))
    step = max(compute, stream) if profile.dit.prefetch else compute + stream
    return processes * rates.disk_seconds(loaded) + preset.steps * step


def _all_to_all_bytes(folder: ModelFolder, preset: Preset, dtype: torch.dtype, split: int) -> float:
    """Bytes one process sends in one DiT forward of a sequence split x`split`: every block's self-attention
    exchanges q, k, v and its output, (split-1)/split of the process's share of the tokens each."""
    if split <= 1:
        return 0.0
    config = folder.open("transformer", layers=0).config
    frames, _, height, width = latent_shape(preset.frames, preset.height, preset.width,
                                            channels=config.in_channels).shape[1:]
    tokens = frames * (height // config.patch_size) * (width // config.patch_size)
    share = tokens / split * config.dim * torch.finfo(dtype).bits / 8
    return 4 * config.num_layers * share * (split - 1) / split


@functools.lru_cache(maxsize=16)
def _shape(folder: ModelFolder, component: str, dtype: torch.dtype) -> ModelShape:
    return planned_model(folder, component, dtype)[1]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def estimate_line(est: Estimate, preset: Preset) -> str:
    """The verdict's lines: total and phases, labelled an estimate, then where its numbers come from."""
    phases = ", ".join(f"{k} {duration(v)}" for k, v in est.seconds.items())
    head = f"about {duration(est.total)}" if est.total is not None else "not available"
    source = ("efficiencies measured on this card (bench/speed_gpu.py --calibrate)" if est.calibrated else
              "peak throughput x assumed efficiencies (" + ", ".join(f"{k} {v:.0%}" for k, v in est.efficiency.items())
              + f"; disk {DISK_GBS:g} GB/s); bench/speed_gpu.py --calibrate measures them on the card at hand")
    notes = "".join(f"; {n}" for n in est.notes)
    return (f"estimate: {head} on {est.card} for {preset}@{preset.steps}: {phases} (attention {est.attention_kernel}, "
            f"matmul {est.matmul})\n  an estimate, from {source}{notes}")


def calibrated(card: Card, kernel: str, measured: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Efficiencies from measurements on `card` (bench/speed_gpu.py --calibrate): per kind, (work, seconds) with
    work = bf16 matmul operations ("matmul"), attention operations of head dim 128 run with `kernel`
    ("attention"), VAE operations in bf16 ("conv"), bytes copied from pinned RAM ("host_link") and bytes read and
    written on the card ("memory"). Each is the estimate's seconds at full peak over the seconds measured."""
    full = {k: 1.0 for k in ASSUMED}
    bf16 = card.tflops("bf16") * 1e12
    at_peak = {"matmul": lambda w: w / bf16, "conv": lambda w: w / bf16,
               "attention": lambda w: attention_seconds(card, kernel, Work(0.0, w, 128), full, bf16),
               "host_link": lambda w: w / (card.host_link_gbs * 1e9), "memory": lambda w: w / (card.memory_gbs * 1e9)}
    return {kind: efficiency(at_peak[kind](work), seconds) for kind, (work, seconds) in measured.items()}
