"""Text (and first image) to video in phases that never share the device: text encoders -> free -> (TI2V: the
first image through the VAE encoder -> free ->) denoise -> free -> decode.

Each phase asks its runtime (machine.py) to load its network, place it per the profile (whole on the device, or
blocks streamed), runs it, and gives the device back before the next phase starts. The memory plan runs this same
code over the planner's runtime (planning/planning_machine.py). This module imports no engine: block streaming,
the speed levers and the tiled VAE decode are the runtime's to attach and run.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable

import torch

from . import progress as progress_bars
from ..defaults import RELEASE_PRESET, SEED, SpeedOptions, sampling_defaults
from ..files.caches import model_identity
from ..files.text_cache import EmbeddingCache
from ..loading.model_folder import ModelFolder, open_model_folder
from ..models.dit import key_mask, key_mask_rows, set_attention_head_chunk, set_token_chunk
from ..profiles import Profile, load_profile
from .conditioning import MAGIC, condition_latents, sample_image_latent
from .machine import DeviceRuntime, Levers, Runtime
from .step_reads import StepReads
from .sampling import (
    cfg_combine,
    dit_timestep,
    euler_step,
    flow_sigmas,
    initial_noise,
    latent_shape,
    motion_score_problem,
    sampling_problem)
from ..files.video import postprocess

CLIP_TOKENS = 77

Embeds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # y (2, S, D), y_mask (2, 77+S), clip (2, 77, Dc)
StepCallback = Callable[[int, torch.Tensor], None]         # (steps done, latents float32)
# (step index, the step's latents, its guided velocity, its sigma), before the Euler step; must not write to them
PreviewHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class PhasePipeline:
    """The phases (encode_prompt, denoise, decode) on one folder and profile, with no pre-flight, plan or
    fallback: those are the job's (run/job.py), and the public `lowvram_stepvideo.StepVideoPipeline` goes through
    it. `__call__` chains the phases for the memory planner and the reference tests. Phase timings land in
    `self.timings`.

    `runtime` does the loading, placing and phase bookkeeping (default: a DeviceRuntime for `profile` on `device`,
    the profile's device when None); the profile in use is the runtime's (`pipe.profile`), fixed for the life of
    the pipeline: `with_profile` gives one that runs another."""

    def __init__(self, folder: ModelFolder, profile: Profile, device=None, cache: EmbeddingCache | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = True, runtime: Runtime | None = None,
                 options: SpeedOptions | None = None):
        self.folder = folder
        self.runtime = runtime or DeviceRuntime(folder, profile, device, log)
        self.options = options or SpeedOptions()
        self.speed: dict | None = None   # what the speed levers did in the last denoise (for the sidecar)
        self.preview: PreviewHook | None = None   # the live preview (pipeline/preview.py's Previewer.step)
        self.step_reads: StepReads | None = None   # the last denoise's host reads (settle_checks)
        self.cache, self.progress = cache, progress
        self.log = self.runtime.log

    @property
    def profile(self) -> Profile:
        return self.runtime.profile

    def with_profile(self, profile: Profile) -> "PhasePipeline":
        """This pipeline running `profile`: the same folder, speed options, embedding cache and runtime state (log,
        timings, phase listeners); this one is left as it is."""
        other = copy.copy(self)
        other.runtime = self.runtime.with_profile(profile)
        return other

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return self.profile.torch_dtype

    @property
    def timings(self) -> dict[str, float]:
        return self.runtime.timings

    @classmethod
    def open(cls, model_dir, profile: str | Profile = "cpu", **kwargs) -> "PhasePipeline":
        profile = profile if isinstance(profile, Profile) else load_profile(profile)
        return cls(open_model_folder(model_dir), profile, **kwargs)

    @property
    def kind(self) -> str:
        """"t2v" or "ti2v" (the folder's DiT: see ModelFolder.kind)."""
        return self.folder.kind

    @property
    def defaults(self) -> dict:
        return sampling_defaults(self.folder.turbo, self.kind)

    @torch.inference_mode()
    def __call__(self, prompt: str | None = None, negative_prompt: str | None = None,
                 num_frames: int = RELEASE_PRESET.frames, height: int = RELEASE_PRESET.height,
                 width: int = RELEASE_PRESET.width, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, time_shift: float | None = None, seed: int = SEED,
                 output_type: str = "uint8", prompt_embeds: Embeds | None = None, latents: torch.Tensor | None = None,
                 pos_magic: str | None = None, start_step: int = 0, step_callback: StepCallback | None = None,
                 image: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                 motion_score: float | None = None):
        """output_type: "latent" (final latents, float32), "video" (decoded (B, T, 3, H, W)) or "uint8" (frames
        (T, H, W, 3) after the reference post-processing). `latents` is the initial noise, or the latents after
        `start_step` steps when resuming. `prompt_embeds` replaces the text phase. TI2V: `image` the first image as
        prepare_first_image makes it (1, 1, 3, H, W), or `image_latents` its sampled latent (1, 1, C, h, w) in its
        place; motion_score (default 5)."""
        if output_type not in ("latent", "video", "uint8"):
            raise ValueError(f"output_type must be 'latent', 'video' or 'uint8', got {output_type!r}")
        steps = num_inference_steps or self.defaults["steps"]
        g = self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        shift = time_shift or self.defaults["shift"]
        problem = sampling_problem(g, shift, seed)   # a NaN guidance scale would give a black video
        if problem:
            raise ValueError(problem)
        shape = latent_shape(num_frames, height, width, channels=self.latent_channels())
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, negative_prompt, pos_magic)
        condition = self.condition(shape.shape, image, image_latents, seed)
        if latents is None:
            latents = initial_noise(shape.shape, seed)
        latents = self.denoise(prompt_embeds, latents, flow_sigmas(steps, shift), g, start_step, step_callback,
                               condition, motion_score)
        if output_type == "latent":
            return latents
        video = self.decode(latents)
        return video if output_type == "video" else postprocess(video)

    def condition(self, shape: tuple[int, ...], image: torch.Tensor | None, image_latents: torch.Tensor | None,
                  seed: int) -> torch.Tensor | None:
        """TI2V's condition latents (1, T, C, h, w) from the first image (encoded here) or its given latent;
        None for T2V, which takes neither."""
        if self.kind != "ti2v":
            if image is not None or image_latents is not None:
                raise ValueError("this is a Step-Video-T2V model: it takes no first image (use a TI2V folder)")
            return None
        if image_latents is None:
            if image is None:
                raise ValueError("a Step-Video-TI2V model needs a first image (image=...) or its latents "
                                 "(image_latents=...)")
            image_latents = self.encode_image(image, seed)
        if tuple(image_latents.shape) != (1, 1, *shape[2:]):
            raise ValueError(f"image_latents of shape {tuple(image_latents.shape)} do not fit this video: expected "
                             f"one latent frame {(1, 1, *shape[2:])}")
        return condition_latents(image_latents, shape[1])

    # ------------------------------------------------------------------ first image (TI2V)

    def encode_image(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The first image (1, 1, 3, H, W) in [-1, 1] -> its latent (1, 1, C, H/16, W/16), float32 on the CPU: a
        sample of the VAE encoder's posterior (noise drawn for `seed`), as the reference encodes it."""
        if image.dim() != 5 or image.shape[:3] != (1, 1, 3):
            raise ValueError(f"the first image must be (1, 1, 3, H, W) as prepare_first_image makes it, got "
                             f"{tuple(image.shape)}")
        with self.runtime.phase("image"):
            vae = self.runtime.load("vae_encoder", self.dtype)
            with self.runtime.placed(vae):
                mean, std = vae.posterior(image.to(self.device))
                latent = sample_image_latent(mean, std, seed)
            return latent.float().cpu()

    def latent_channels(self) -> int:
        return self.folder.open("transformer", layers=0).config.in_channels

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompt: str | None, negative_prompt: str | None = None,
                      pos_magic: str | None = None) -> Embeds:
        """[prompt + pos_magic, negative prompt] -> (y, y_mask, clip); the magic suffix and the default negative
        prompt are the reference's for the folder's kind (conditioning.MAGIC)."""
        return self.encode_prompts([(prompt, negative_prompt)], pos_magic)[0]

    def encode_prompts(self, prompts: list[tuple[str | None, str | None]],
                       pos_magic: str | None = None) -> list[Embeds]:
        """encode_prompt for many (prompt, negative prompt) pairs in one text phase: each network is loaded once,
        pairs in the embedding cache are taken from it."""
        magic, neg_magic = MAGIC[self.kind]
        pos_magic = magic if pos_magic is None else pos_magic
        for prompt, negative_prompt in prompts:
            if not prompt or not prompt.strip():
                raise ValueError("the prompt is empty; describe the video to generate")
            for warning in self.folder.prompt_warnings(prompt, negative_prompt):
                self.log(warning)
        texts = [[prompt + pos_magic, neg_magic if neg is None else neg] for prompt, neg in prompts]
        embeds = [self.cache.get(t) if self.cache else None for t in texts]
        if any(e is not None for e in embeds):
            self.log("text: embeddings taken from the cache" if len(texts) == 1 else
                     f"text: embeddings of {sum(e is not None for e in embeds)} of {len(texts)} prompts taken "
                     "from the cache")
        todo = [i for i, e in enumerate(embeds) if e is None]
        if todo:
            with self.runtime.phase("text"):
                llm_out = self._run_step_llm([texts[i] for i in todo])
                clips = self._run_clip([texts[i] for i in todo])
            for i, (y, y_mask), clip in zip(todo, llm_out, clips):
                embeds[i] = (y, y_mask, clip)
                if self.cache:
                    self.cache.put(texts[i], embeds[i])
        return [tuple(t.to(self.device) for t in e) for e in embeds]

    def _run_step_llm(self, texts: list[list[str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(y, y_mask) per pair of texts, step_llm loaded and placed once."""
        tokenizer, out = self.folder.step_llm_tokenizer(), []
        llm = self.runtime.load("step_llm", self.dtype)
        with self.runtime.placed(llm, "text_encoders"), self.block_progress(llm, "step_llm", len(texts)):
            for pair in texts:
                ids, mask = tokenizer(pair)
                y = llm(ids.to(self.device), mask.to(self.device)).to(self.dtype)
                ones = torch.ones(len(pair), CLIP_TOKENS, dtype=mask.dtype)
                out.append((y, torch.cat([ones, mask], dim=1).to(self.device)))   # CLIP tokens first, all attended
        return out

    @contextlib.contextmanager
    def block_progress(self, model: torch.nn.Module, name: str, passes: int = 1):
        """A progress bar over a stack's blocks (step_llm streamed from disk takes a while on a small card)."""
        blocks = self.runtime.blocks(model)
        with progress_bars.bar(name, len(blocks) * passes, unit="block", show=self.progress) as bar:
            hooks = [b.register_forward_hook(_ticker(bar)) for b in blocks]
            try:
                yield
            finally:
                for h in hooks:
                    h.remove()

    def _run_clip(self, texts: list[list[str]]) -> list[torch.Tensor]:
        tokenizer = self.folder.clip_tokenizer()
        clip = self.runtime.load("hunyuan_clip", torch.float32)    # the reference runs it in float32
        with self.runtime.placed(clip):
            return [clip(*(t.to(self.device) for t in tokenizer(pair))).to(self.dtype) for pair in texts]

    def embedding_cache(self, folder=None) -> EmbeddingCache:
        tokenizers = [self.folder.root / "step_llm" / "step1_chat_tokenizer.model",
                      self.folder.root / "hunyuan_clip" / "tokenizer" / "vocab.txt",
                      self.folder.root / "hunyuan_clip" / "tokenizer" / "tokenizer_config.json"]
        files = self.folder.files("step_llm") + self.folder.files("hunyuan_clip") + tokenizers
        widths = tuple(self.folder.open("transformer", layers=0).config.caption_channels)   # what the DiT reads
        return EmbeddingCache(model_identity(files) + f"-{self.profile.compute_dtype}", folder, widths=widths)

    # ------------------------------------------------------------------ denoise

    def denoise(self, embeds: Embeds, latents: torch.Tensor, sigmas: torch.Tensor, guidance_scale: float,
                start_step: int = 0, step_callback: StepCallback | None = None,
                condition: torch.Tensor | None = None, motion_score: float | None = None,
                on_non_finite: Callable[[int], None] | None = None) -> torch.Tensor:
        """Euler steps start_step..N-1 from `latents`; returns float32 latents on the CPU. TI2V: `condition`
        (1, T, C, h, w) the condition latents (the same for both CFG branches), `motion_score` (default 5).
        `on_non_finite(steps done)`: each step's latents are checked to be finite on the device and read with the
        step's one host read (step_reads.py: at most a step later, before the next step runs past block 0); a
        NaN or infinity calls it, and it raises. Call `settle_checks()` before saving latents a step handed over."""
        y, y_mask, clip = (t.to(self.device) for t in embeds)
        keys = y_mask if y_mask is None else key_masks(y_mask.to(self.dtype), y.shape[1] + clip.shape[1])  # Q1
        embeds = (y.to(self.dtype), keys, clip.to(self.dtype))
        extra = self._ti2v_inputs(condition, motion_score)
        steps = len(sigmas) - 1
        host_sigmas, sigmas = sigmas, sigmas.to(self.device)    # staged once: no step copies a timestep to the device
        with self.runtime.phase("denoise"):
            dit = self.runtime.load("transformer", self.dtype)
            with self.runtime.placed(dit, "dit"), progress_bars.bar("denoise", steps, unit="step",
                                                                    initial=start_step, show=self.progress) as bar:
                set_token_chunk(dit, self.profile.token_chunk or None)
                set_attention_head_chunk(dit, self.profile.attention_head_chunk or None)
                levers = self.runtime.attach_levers(dit, self.options, said=self.speed is not None)
                reads = self.step_reads = StepReads()
                try:
                    latents = latents.to(self.device)
                    for i in range(start_step, steps):
                        reads.start_step()
                        levers.start_step(i, steps, reads.read)
                        v = self._guided_velocity(dit, latents, sigmas[i], embeds, guidance_scale, levers, extra)
                        if self.preview:
                            self.preview(i, latents, v, host_sigmas[i])   # a host sigma: no extra sync
                        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
                        if on_non_finite:
                            reads.end_step(torch.isfinite(latents).all(), functools.partial(on_non_finite, i + 1))
                        bar.update()
                        if step_callback:
                            step_callback(i + 1, latents)
                    reads.settle()
                finally:
                    self.speed = self.runtime.detach_levers(levers) or self.speed
            latents = latents.float().cpu()
        return latents

    def settle_checks(self) -> None:
        """Read the last denoise's pending finiteness checks now (on_non_finite raises for a failed one)."""
        if self.step_reads is not None:
            self.step_reads.settle()

    def _ti2v_inputs(self, condition: torch.Tensor | None, motion_score: float | None) -> tuple:
        """(condition latents, motion score) as the DiT takes them for one sample (the batch is made per call), in
        the compute dtype like the reference; () for T2V."""
        if self.kind != "ti2v":
            if condition is not None or motion_score is not None:
                raise ValueError("this is a Step-Video-T2V model: it takes no first image or motion score")
            return ()
        if condition is None:
            raise ValueError("a Step-Video-TI2V model needs the first image's condition latents")
        score = self.defaults["motion_score"] if motion_score is None else motion_score
        problem = motion_score_problem(score)
        if problem:
            raise ValueError(problem)
        motion = torch.tensor([score], dtype=self.dtype, device=self.device)
        return condition.to(self.device, self.dtype), motion

    def _guided_velocity(self, dit, latents, t, embeds: tuple, scale: float, levers: Levers,
                         extra: tuple) -> torch.Tensor:
        """`t`: the step's sigma on the device; `embeds`: (y, key masks per branch, clip) as denoise stages them."""
        y, masks, clip = embeds
        x = latents.to(self.dtype)
        if self.profile.cfg_mode == "batch":
            pair = [torch.cat([e, e]) for e in extra]   # the same condition for both branches
            with levers.branch("cond+uncond"):
                v = dit(torch.cat([x, x]), dit_timestep(t, 2, self.dtype), y, clip, masks and masks[2], *pair)
            v_cond, v_uncond = v.chunk(2)
        else:
            v_cond, v_uncond = (self._branch(dit, levers, b, x, t, embeds, extra) for b in (0, 1))
        return cfg_combine(v_cond, v_uncond, scale)

    def _branch(self, dit, levers: Levers, b: int, x, t, embeds: tuple, extra: tuple) -> torch.Tensor:
        """Sequential CFG: the DiT on prompt b (0 = cond, 1 = uncond) alone."""
        y, masks, clip = embeds
        with levers.branch(("cond", "uncond")[b]):
            return dit(x, dit_timestep(t, 1, self.dtype), y[b:b + 1], clip[b:b + 1], masks and masks[b], *extra)

    # ------------------------------------------------------------------ decode

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Latents (B, T, C, h, w) -> video (B, F, 3, H, W) on the CPU, tiled per the profile; on out-of-memory
        the finished chunks are kept and tiles get smaller."""
        with self.runtime.phase("decode"):
            vae = self.runtime.load("vae", self.dtype)
            z = latents.to(self.device, self.dtype)
            h, w = z.shape[-2:]
            tile = tile or self.profile.vae.tile or max(h, w)
            overlap = min(self.profile.vae.overlap, max(0, (min(tile, h, w) - 1) // 2))
            tiles, total = self.runtime.vae_tiles(z.shape, tile, overlap)
            with self.runtime.placed(vae), progress_bars.bar("decode", total, unit="tile",
                                                             show=self.progress) as bar:
                return self.runtime.decode_tiled(vae, z, tiles, overlap, on_oom=self._tile_oom,
                                                 progress=_tile_progress(bar))

    def _tile_oom(self, failed: tuple, nxt: tuple) -> None:
        self.runtime.free()
        self.log(f"decode: out of memory with {failed[0]}x{failed[1]} latent tiles; "
                 f"continuing with {nxt[0]}x{nxt[1]} (finished chunks are kept)")


def key_masks(mask: torch.Tensor, keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DiT's key masks for a denoising phase, built once (models.dit.key_mask): (cond, uncond, both)."""
    both = key_mask(mask, keys)
    return key_mask_rows(both, slice(0, 1)), key_mask_rows(both, slice(1, 2)), both


def _ticker(bar):
    def hook(*_) -> None:   # a forward hook must return None to keep the block's output
        bar.update()
    return hook


def _tile_progress(bar):
    """decode_tiled's (done, total) of each attempt -> one bar: after an out-of-memory retry with smaller tiles,
    the total becomes the tiles already decoded plus those the retry has left."""
    offset = 0

    def update(done: int, total: int) -> None:
        nonlocal offset
        if done == 0:
            offset = bar.done
            if bar.total != offset + total:
                bar.set_total(offset + total)
        if offset + done > bar.done:
            bar.update(offset + done - bar.done)
    return update
