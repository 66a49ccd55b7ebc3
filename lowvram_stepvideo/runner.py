"""One generation request run to the end: pick a preset that fits, denoise with checkpoints, step down on OOM.

- Before a GPU run, the memory plan picks the largest preset of the ladder that fits the card.
- The prompt is encoded once; an out-of-memory error there retries with step_llm streamed block by block.
- An out-of-memory error while denoising frees everything and retries with the next smaller preset (same number of
  steps); decoding handles its own OOM with smaller tiles.
- Every `checkpoint_every` steps, and after the last one, the latents are saved atomically next to the output (so a
  failed decode does not cost the denoising); Ctrl-C saves and stops.

Grad mode is off with torch.no_grad(), not inference_mode(): block streaming fills its buffers in a worker thread,
where inference mode is off, and such a thread may not write into tensors made under inference mode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .parallel import LostRank, Parallel
from .pipeline import StepVideoPipeline
from .profiles import Preset, TextEncoders
from .resume import load_checkpoint, save_checkpoint, saved_request
from .sampling import flow_sigmas, initial_noise, latent_shape

_OOM = torch.OutOfMemoryError
GiB = 2**30


class Interrupted(Exception):
    """Ctrl-C during denoising; the latents were saved to `path`."""

    def __init__(self, path: Path, step: int):
        super().__init__(f"interrupted after step {step}; saved to {path} (continue with --resume)")
        self.path, self.step = path, step


class OutOfMemory(Exception):
    pass


@dataclass
class Request:
    prompt: str
    negative_prompt: str | None
    preset: Preset
    guidance_scale: float
    shift: float
    seed: int

    def fingerprint(self, model_dir: Path, compute_dtype: str) -> dict:
        """What a resume checkpoint must match."""
        return {"model": str(model_dir), "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "preset": str(self.preset), "steps": self.preset.steps, "guidance_scale": self.guidance_scale, "shift": self.shift,
                "seed": self.seed, "compute_dtype": compute_dtype}


def ladder_from(presets: tuple[Preset, ...], first: Preset) -> list[Preset]:
    """`first`, then every preset of the profile that is smaller, with `first`'s number of steps (memory does not
    depend on it, and a fallback should not silently change the quality asked for)."""
    return [first] + [dataclasses.replace(p, steps=first.steps) for p in presets if p.tokens < first.tokens]


def resume_ladder(ladder: list[Preset], ckpt: Path) -> list[Preset]:
    """The ladder from the preset the checkpoint was saved at (an earlier run may have stepped down on OOM)."""
    saved = saved_request(ckpt)
    at = [i for i, p in enumerate(ladder) if saved and str(p) == saved.get("preset")]
    return ladder[at[0]:] if at else ladder


def fit_to_card(pipe: StepVideoPipeline, ladder: list[Preset], vram_bytes: int,
                log: Callable[[str], None], layout=None) -> list[Preset]:
    """Drop the head of the ladder while the memory plan says it does not fit; lower the profile's resident
    blocks to what fits (pipe.profile is updated). Presets are largest first, so the first that fits is found by
    bisection: a few plans, not one per preset."""
    from .plan import fit_profile
    budget = int(vram_bytes * 0.95)    # allocator fragmentation and kernels' workspaces
    fitted = {}

    def fits(i: int) -> bool:
        fitted[i] = fit_profile(pipe.folder, pipe.profile, ladder[i], budget, layout=layout)   # per rank
        return fitted[i][1].peak_vram_bytes <= budget
    lo, hi = 0, len(ladder)            # the first preset that fits is in ladder[lo:hi], or none does
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    if lo == len(ladder):
        log(f"plan: even {ladder[-1]} is planned above the card's {vram_bytes / GiB:.1f} GiB; trying it anyway")
        return ladder[-1:]
    profile, plan = fitted[lo]
    if lo:
        log(f"plan: {ladder[0]} does not fit in {vram_bytes / GiB:.1f} GiB; using {ladder[lo]}")
    log(f"plan: {plan.peak_vram_bytes / GiB:.1f} GiB peak, {profile.dit.resident_blocks} DiT blocks resident")
    pipe.profile = profile
    return ladder[lo:]


def denoise_with_fallback(pipe: StepVideoPipeline, request: Request, ladder: list[Preset], ckpt: Path | None,
                          resume: bool, every: int, par: Parallel | None = None) -> tuple[torch.Tensor, Preset]:
    """Final latents and the preset that produced them. With `par` (several processes): rank 0 encodes the
    prompt and broadcasts it, only rank 0 saves checkpoints, and an out-of-memory error steps every rank down
    together (a rank whose peers did not fail with it ends the run at the collective timeout instead)."""
    if resume and ckpt is not None:   # a missing or mismatched checkpoint is refused before any heavy work
        load_checkpoint(ckpt, dataclasses.replace(request, preset=ladder[0]).fingerprint(
            pipe.folder.root, pipe.profile.compute_dtype))
    embeds = encode_with_fallback(pipe, request) if par is None or par.writer else None
    if par is not None:
        embeds = par.broadcast_from_writer(embeds)
    for i, preset in enumerate(ladder):
        req = dataclasses.replace(request, preset=preset)
        try:
            return denoise(pipe, req, embeds, ckpt, resume and i == 0, every, par is None or par.writer), preset
        except _OOM:
            pass  # handled outside the except block, so the failed attempt's tensors can be freed
        _free(pipe)
        if par is not None:
            par.all_agree(False)   # every rank ran out of memory at this preset: step down together
        if i + 1 == len(ladder):
            raise OutOfMemory(f"out of memory even at {preset}; use a smaller --profile or free GPU memory")
        pipe.log(f"denoise: out of memory at {preset}; memory freed, retrying at {ladder[i + 1]}")
    raise AssertionError("empty ladder")


def denoise(pipe: StepVideoPipeline, req: Request, embeds, ckpt: Path | None, resume: bool,
            every: int, save: bool = True) -> torch.Tensor:
    """`save`: this process writes the checkpoints (False on every rank but 0 of a parallel run)."""
    shape = latent_shape(req.preset.frames, req.preset.height, req.preset.width, channels=pipe.latent_channels())
    fingerprint = req.fingerprint(pipe.folder.root, pipe.profile.compute_dtype)
    latents, start = initial_noise(shape.shape, req.seed), 0
    if resume and ckpt is not None:
        latents, start = load_checkpoint(ckpt, fingerprint)
        pipe.log(f"resuming at step {start} of {req.preset.steps} from {ckpt}")
        if start >= req.preset.steps:
            return latents   # denoising had finished (the decode failed): nothing to load the DiT for
    state = {"step": start, "latents": latents}

    def on_step(done: int, current: torch.Tensor) -> None:
        state.update(step=done, latents=current)
        if save and ckpt is not None and every and (done % every == 0 or done == req.preset.steps):
            save_checkpoint(ckpt, current, done, fingerprint)

    sigmas = flow_sigmas(req.preset.steps, req.shift)
    try:
        with torch.no_grad():
            return pipe.denoise(embeds, latents, sigmas, req.guidance_scale, start, on_step)
    except KeyboardInterrupt:
        if ckpt is None or not save:
            raise
        save_checkpoint(ckpt, state["latents"], state["step"], fingerprint)
        raise Interrupted(ckpt, state["step"]) from None
    except LostRank as e:
        if ckpt is None or not save or state["step"] == start:
            raise
        save_checkpoint(ckpt, state["latents"], state["step"], fingerprint)
        raise LostRank(f"{e}; the latents after step {state['step']} are saved in {ckpt}: "
                       "run the same command with --resume") from None


def encode_with_fallback(pipe: StepVideoPipeline, req: Request):
    """The text phase as the profile says; on OOM once more with step_llm streamed block by block."""
    for attempt in range(2):
        try:
            with torch.no_grad():
                return pipe.encode_prompt(req.prompt, req.negative_prompt)
        except _OOM:
            pass  # handled outside the except block, so the failed attempt's tensors can be freed
        _free(pipe)
        te = pipe.profile.text_encoders
        if attempt or (te.placement == "stream" and te.resident_blocks == 0):
            break
        pipe.log("out of memory in the text encoders; retrying with step_llm streamed block by block")
        streamed = TextEncoders(placement="stream", resident_blocks=0, prefetch=max(1, te.prefetch),
                                source=te.source)
        pipe.profile = dataclasses.replace(pipe.profile, text_encoders=streamed)
    raise OutOfMemory("out of memory in the text encoders even with step_llm streamed; free GPU memory")


def _free(pipe: StepVideoPipeline) -> None:
    pipe.runtime.free()
