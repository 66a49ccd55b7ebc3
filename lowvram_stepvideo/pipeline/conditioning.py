"""What each model kind conditions on besides the noise: the magic prompts the reference adds to the text (T2V's,
TI2V's), and for Step-Video-TI2V the first image (preprocessed as the model sees it) and its condition latents
(docs/STEPVIDEO.md §3.5)."""
from __future__ import annotations

import torch

from ..files.images import preprocess, to_rgb_image
from .sampling import SEED_MAX, latent_shape

# Suffixes the reference appends to every prompt / uses as the negative prompt, per model kind (T2V: its
# config.py defaults; TI2V: its pipeline's).
MAGIC = {
    "t2v": ("超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。",
            "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"),
    "ti2v": ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、超高清、画面稳定、"
             "逼真的细节、专业级构图、超细节、清晰。",
             "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指"),
}
# The posterior sample of the first image draws its noise from a generator seeded with the video's seed mixed with
# this constant, so it is not the start of the initial noise's stream (same seed, same generator kind).
IMAGE_NOISE_SALT = 0x9E3779B97F4A7C15


def prepare_first_image(image, height: int, width: int) -> torch.Tensor:
    """The first image exactly as a TI2V model sees it: float32 (1, 1, 3, H, W) in [-1, 1], with H and W the
    video's size rounded as the model rounds it (multiples of 16). `image`: a file path (PNG, JPEG, WebP), a PIL
    image, a uint8 array (H, W[, 3|4]) or a tensor (3, H, W) / (1, 3, H, W), uint8 or float in [0, 1]."""
    shape = latent_shape(1, height, width)
    return preprocess(to_rgb_image(image), shape.height, shape.width)


def image_noise_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((seed ^ IMAGE_NOISE_SALT) & SEED_MAX)


def sample_image_latent(mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """mean + std * eps, eps standard normal drawn in float32 on the CPU for `seed` (so a seed gives the same
    latent on every machine), like the reference's posterior sample."""
    eps = torch.randn(mean.shape, generator=image_noise_generator(seed), dtype=torch.float32)
    return mean + std * eps.to(device=mean.device, dtype=mean.dtype)


def condition_latents(image_latent: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """The first image's latent (1, 1, C, h, w) in latent frame 0 and zeros in the others: (1, T, C, h, w),
    rounded to bfloat16 as the reference pipeline does (whatever the compute dtype), returned in float32."""
    if image_latent.dim() != 5 or image_latent.shape[:2] != (1, 1):
        raise ValueError(f"image_latents must be one latent frame (1, 1, C, h, w), got {tuple(image_latent.shape)}")
    out = torch.zeros((1, latent_frames, *image_latent.shape[2:]), dtype=torch.float32, device=image_latent.device)
    out[:, :1] = image_latent.to(torch.bfloat16).float()
    return out
