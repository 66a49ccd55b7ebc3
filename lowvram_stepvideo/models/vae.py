"""Step-Video video VAE, version 2 (`vae/vae_v2.safetensors`): causal 3D conv encoder/decoder, 16x spatial,
17 frames <-> 3 latents per chunk, 64 latent channels, no latent scaling (docs/STEPVIDEO.md §7).

Layout inside the networks is (b, c, t, h, w); the public API takes and returns (b, t, c, h, w) like the release.
Every GroupNorm takes its statistics per frame (the release's version-2 behaviour). Every causal conv sees
`k_t - 1` zero frames in front of its input and none behind; in resnet blocks those frames are inserted after
GroupNorm+SiLU, i.e. they are zeros of the normalised activation.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from ..files.configs import VAEConfig

GROUPS = 32
SLICED_CONV_NUMEL = 2**30   # a 3D conv whose (padded) input or output reaches this size runs in time slices
TIME_SLICES = 4
REMAIN, MIX = 0.6, 0.4      # chunk-boundary blending weights


# ---------------------------------------------------------------------------------------------- tensor helpers

def pad_front(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b, c, t, h, w) -> (b, c, frames + t, h, w) with zero frames in front."""
    return F.pad(x, (0, 0, 0, 0, frames, 0)) if frames else x


def to_frames(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b c t h w -> (b t) c h w")


def from_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    return rearrange(x, "(b t) c h w -> b c t h w", b=batch)


def conv3d_time_sliced(x: torch.Tensor, conv: nn.Conv3d, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) (+ residual), x already padded in time. Like the release, a conv touching >= 2^30 elements is
    evaluated over 4 slices of output frames (each slice reads its k_t - 1 extra input frames): same values."""
    out_numel = x.numel() // conv.in_channels * conv.out_channels
    if conv.stride[0] != 1 or max(x.numel(), out_numel) < SLICED_CONV_NUMEL:
        out = conv(x)
        return out if residual is None else out + residual
    k = conv.kernel_size[0]
    t_out = x.shape[2] - k + 1
    step = -(-t_out // TIME_SLICES)
    out = None
    for start in range(0, t_out, step):
        stop = min(start + step, t_out)
        piece = conv(x[:, :, start:stop + k - 1])                  # (b, c_out, stop - start, h', w')
        if residual is not None:
            piece = piece + residual[:, :, start:stop]
        if out is None:
            out = piece.new_empty((*piece.shape[:2], t_out, *piece.shape[3:]))
        out[:, :, start:stop] = piece
    return out


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(b, c*f^3, t, h, w) -> (b, c, f*t - (f-1), f*h, f*w): channels (c, ft, fh, fw) spread over time and space,
    then the first f-1 frames are dropped (the causal convention)."""
    b, cf, t, h, w = x.shape
    c = cf // factor**3
    x = x.view(b, c, factor, factor, factor, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, t, f, h, f, w, f)
    x = x.reshape(b, c, t * factor, h * factor, w * factor)
    return x[:, :, factor - 1:]


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of pixel_shuffle_3d: pad f-1 zero frames in front, then (b, c, f*t, f*h, f*w) -> (b, c*f^3, t, h, w)."""
    x = pad_front(x, factor - 1)
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // factor, factor, h // factor, factor, w // factor, factor)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                                   # (b, c, f, f, f, t', h', w')
    return x.reshape(b, c * factor**3, t // factor, h // factor, w // factor)


def duplicate_channels_up(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free shortcut of an upsampling conv: repeat each channel, then pixel-shuffle."""
    repeats = out_channels * factor**3 // x.shape[1]
    return pixel_shuffle_3d(x.repeat_interleave(repeats, dim=1), factor)


def average_channels_down(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free shortcut of a downsampling conv: pixel-unshuffle, then average groups of adjacent channels."""
    y = pixel_unshuffle_3d(x, factor)                                       # (b, c*f^3, t', h', w')
    b, cf, t, h, w = y.shape
    return y.view(b, out_channels, cf // out_channels, t, h, w).mean(dim=2)


def mix_chunks(video: torch.Tensor, frame_len: int = 17, inplace: bool = False) -> torch.Tensor:
    """Blend every pair of frames at a chunk boundary of a (b, t, c, h, w) video made of `frame_len`-frame chunks:
    first b <- 0.6 b + 0.4 f (b = first frame of the next chunk, f = last frame of this one), then
    f <- 0.6 f + 0.4 b with the updated b."""
    front = slice(frame_len - 1, video.shape[1] - 1, frame_len)
    back = slice(frame_len, video.shape[1], frame_len)
    out = video if inplace else video.clone()
    new_back = out[:, back] * REMAIN + out[:, front] * MIX
    out[:, back] = new_back
    out[:, front] = out[:, front] * REMAIN + new_back * MIX
    return out


# ---------------------------------------------------------------------------------------------- layers

class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm(32) over (b, c, t, h, w) with statistics per frame."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return out.view(b, t, c, h, w).transpose(1, 2)


class CausalConv(nn.Module):
    """Conv3d with k_t - 1 zero frames in front (none behind) and k//2 zero padding in h and w."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv3d_time_sliced(pad_front(x, self.time_pad), self.conv, residual)


class Resnet3DBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(in_channels)
        self.conv1 = CausalConv(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(out_channels)
        self.conv2 = CausalConv(out_channels, out_channels, 3)
        self.nin_shortcut = CausalConv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return self.conv2(F.silu(self.norm2(h)), residual=shortcut)


class AttnBlock(nn.Module):
    """Single-head causal self-attention over all t*h*w positions in (t, h, w) raster order, scale 1/sqrt(c)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = FrameGroupNorm(channels)
        self.q = CausalConv(channels, channels, 1)
        self.k = CausalConv(channels, channels, 1)
        self.v = CausalConv(channels, channels, 1)
        self.proj_out = CausalConv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        normed = self.norm(x)
        # Contiguous (b, 1, t*h*w, c): SDPA's memory-efficient kernel needs the last dim dense; with the strided
        # view it falls back to the math kernel and its (t*h*w)^2 float32 scores. Flash cannot take c = 512.
        q, k, v = (rearrange(p(normed), "b c t h w -> b 1 (t h w) c").contiguous() for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # (b, 1, t*h*w, c)
        out = rearrange(out, "b 1 (t h w) c -> b c t h w", t=t, h=h, w=w)
        return self.proj_out(out, residual=x)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = Resnet3DBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = Resnet3DBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Res3DBlockUpsample(nn.Module):
    """r = GN2(conv2(SiLU(GN1(conv1(x))))); out = SiLU(r + x) + x (the input is added twice, as released)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = CausalConv(channels, channels, 3)
        self.norm1 = FrameGroupNorm(channels)
        self.conv2 = CausalConv(channels, channels, 3)
        self.norm2 = FrameGroupNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.silu(self.norm1(self.conv1(x)))
        r = self.norm2(self.conv2(r))
        return F.silu(r + x) + x


class Upsample3D(nn.Module):
    """Nearest x2 in t, h and w: (b, c, t, h, w) -> (b, c, 2t, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3d = Res3DBlockUpsample(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Upsample2D(nn.Module):
    """Per frame nearest x2 then a 3x3 conv: (b, c, t, h, w) -> (b, c, t, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = F.interpolate(to_frames(x), scale_factor=2.0, mode="nearest")   # (b*t, c, 2h, 2w)
        return from_frames(self.conv(frames), x.shape[0])


class Downsample2D(nn.Module):
    """Per frame pad right/bottom by one, then a 3x3 stride-2 conv: (b, c, t, h, w) -> (b, c, t, h/2, w/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = F.pad(to_frames(x), (0, 1, 0, 1))                             # (b*t, c, h+1, w+1)
        return from_frames(self.conv(frames), x.shape[0])


class Downsample3D(nn.Module):
    """Causal 3x3x3 stride-2 conv: (b, c, t, h, w) -> (b, c, (t-1)//2 + 1, ceil(h/2), ceil(w/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvPixelShuffleUp(nn.Module):
    """Causal conv to out*f^3 channels, then pixel shuffle: (b, c, t, h, w) -> (b, out, f*t - (f-1), f*h, f*w)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(in_channels, out_channels * factor**3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), self.factor)


class ConvPixelUnshuffleDown(nn.Module):
    """Causal conv to out/f^3 channels, then pixel unshuffle: (b, c, t, h, w) -> (b, out, (t+f-1)/f, h/f, w/f)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(in_channels, out_channels // factor**3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_3d(self.conv(x), self.factor)


# ---------------------------------------------------------------------------------------------- encoder / decoder

def patch_channels(config: VAEConfig) -> int:
    """Width between the latent and the first/last resnet level (2048 in the release)."""
    return 4 * config.z_channels * 2**3


def res_blocks(in_channels: int, out_channels: int, count: int) -> nn.ModuleList:
    """`count` resnet blocks; the first changes the width."""
    widths = [in_channels] + [out_channels] * count
    return nn.ModuleList(Resnet3DBlock(a, b) for a, b in zip(widths, widths[1:]))


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: nn.Module | None):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, num_blocks)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: nn.Module | None):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, num_blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VideoDecoder(nn.Module):
    """One chunk of latents (b, z, k, h, w) -> frames (b, 3, (2k-1)*4 - 3, 16h, 16w) (release widths)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        d = config.decoder
        width = [d.ch * m for m in d.ch_mult]                       # per level; level 0 = full resolution
        self.patch_channels = patch_channels(config)
        self.top_channels = width[-1]
        self.dropped_frames = d.temporal_downsample - 1
        self.conv_in = CausalConv(config.z_channels, self.patch_channels, 3)
        self.conv_unpatchify = ConvPixelShuffleUp(self.patch_channels, width[-1], 2)
        self.mid = MidBlock(width[-1])
        level_in = width[1:] + width[-1:]                           # level i starts at the width of level i+1
        # one more resnet block per level than the encoder (num_res_blocks + 1), as released; run top level first
        self.up = nn.ModuleList(UpLevel(level_in[i], width[i], config.num_res_blocks + 1, self._upsample(config, i))
                                for i in range(len(width)))
        self.norm_out = FrameGroupNorm(width[0])
        self.conv_out = CausalConv(width[0], config.out_channels, 3)

    @staticmethod
    def _upsample(config: VAEConfig, level: int) -> nn.Module | None:
        channels = config.decoder.ch * config.decoder.ch_mult[level]
        if level == 0:
            return None
        return Upsample3D(channels) if level in config.decoder.temporal_up_layers else Upsample2D(channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # release widths, z (b, 64, k, h, w)
        h = self.conv_in(z) + duplicate_channels_up(z, self.patch_channels, 1)        # (b, 2048, k, h, w)
        h = self.conv_unpatchify(h) + duplicate_channels_up(h, self.top_channels, 2)  # (b, 512, 2k-1, 2h, 2w)
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)                                        # level 0 leaves (b, 128, 4(2k-1), 16h, 16w)
        h = self.conv_out(F.silu(self.norm_out(h)))             # (b, 3, 4(2k-1), 16h, 16w)
        return h[:, :, self.dropped_frames:]                    # (b, 3, 4(2k-1) - 3, 16h, 16w)


class VideoEncoder(nn.Module):
    """One chunk of frames (b, 3, t, H, W) -> moments [mean | logvar] (b, 2z, t_lat, H/16, W/16); 17 frames -> 3."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        e = config.encoder
        width = [e.ch] + [e.ch * m for m in e.ch_mult]              # width[i] enters level i, width[i+1] leaves it
        self.patch_channels = patch_channels(config)
        self.moment_channels = 2 * config.z_channels
        self.conv_in = CausalConv(config.in_channels, e.ch, 3)
        self.down = nn.ModuleList(DownLevel(width[i], width[i + 1], config.num_res_blocks, self._downsample(config, i))
                                  for i in range(len(e.ch_mult)))
        self.mid = MidBlock(width[-1])
        self.norm_out = FrameGroupNorm(width[-1])
        self.conv_patchify = ConvPixelUnshuffleDown(width[-1], self.patch_channels, 2)
        self.conv_out = CausalConv(self.patch_channels, self.moment_channels, 3)

    @staticmethod
    def _downsample(config: VAEConfig, level: int) -> nn.Module | None:
        channels = config.encoder.ch * config.encoder.ch_mult[level]
        if level == len(config.encoder.ch_mult) - 1:
            return None
        return Downsample3D(channels) if level in config.encoder.down_sampling_layer else Downsample2D(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # release widths, x (b, 3, 17, H, W)
        h = self.conv_in(x)                                                         # (b, 32, 17, H, W)
        for level in self.down:
            h = level(h)                                                            # ... (b, 512, 5, H/8, W/8)
        h = F.silu(self.norm_out(self.mid(h)))
        h = self.conv_patchify(h) + average_channels_down(h, self.patch_channels, 2)  # (b, 2048, 3, H/16, W/16)
        shortcut = average_channels_down(h, self.moment_channels, 1)                # (b, 128, 3, H/16, W/16)
        return self.conv_out(h, residual=shortcut)


class AutoencoderKL(nn.Module):
    """Step-Video VAE v2. Public tensors are (b, t, c, h, w); outputs have the module's dtype."""

    def __init__(self, config: VAEConfig, with_encoder: bool, with_decoder: bool = True):
        super().__init__()
        if not (with_encoder or with_decoder):
            raise ValueError("a VAE needs its encoder, its decoder or both")
        self.config = config
        self.encoder = VideoEncoder(config) if with_encoder else None
        self.decoder = VideoDecoder(config) if with_decoder else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """One chunk, decoded on its own (fresh causal padding), not blended: (b, k <= latent_len, z, h, w) ->
        (b, config.frames_for_latents(k), 3, 16h, 16w), i.e. (2k-1)*4 - 3 frames. Any h, w (spatial tiles too)."""
        self._check_latents(z)
        if self.decoder is None:
            raise ValueError("this VAE was built without its decoder (an encoder-only VAE encodes the first image)")
        if z.shape[1] > self.config.latent_len:
            raise ValueError(f"decode_chunk takes at most {self.config.latent_len} latent frames, got {z.shape[1]}; "
                             "use decode() for longer latents")
        frames = self.decoder(rearrange(z.to(self.dtype), "b t c h w -> b c t h w"))
        return rearrange(frames, "b c t h w -> b t c h w")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(b, T_lat, z, h, w) -> (b, T, 3, 16h, 16w): chunks of latent_len latents decoded independently,
        concatenated (frame_len frames each, fewer for a short last chunk), then blended at chunk boundaries."""
        self._check_latents(z)
        chunks = [self.decode_chunk(c) for c in z.split(self.config.latent_len, dim=1)]
        return mix_chunks(torch.cat(chunks, dim=1), self.config.frame_len, inplace=True)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(b, T, 3, H, W) -> [mean | logvar] (b, T_lat, 2z, H/16, W/16), chunks of frame_len frames."""
        if self.encoder is None:
            raise ValueError("this VAE was loaded without encoder weights; encoding needs a vae_v2 file that has them")
        x = rearrange(x.to(self.dtype), "b t c h w -> b c t h w")
        chunks = x.split(self.config.frame_len, dim=2)
        if not self._encodable(chunks[-1].shape[2]):
            raise ValueError(f"cannot encode {x.shape[2]} frames: the last chunk would have {chunks[-1].shape[2]}, "
                             "the encoder takes 8n+1 to 8n+4 frames per chunk (e.g. 17)")
        moments = [self.encoder(c) for c in chunks]
        return rearrange(torch.cat(moments, dim=2), "b c t h w -> b t c h w")

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample mean + std * eps of the posterior (as released); eps from `generator` (float32, then cast)."""
        mean, std = self.posterior(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device).to(mean.dtype)
        return mean + std * eps

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T, 3, H, W) -> the posterior's mean and std, each (b, T_lat, z, H/16, W/16)."""
        mean, logvar = self.encode_moments(x).chunk(2, dim=2)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def _encodable(self, frames: int) -> bool:
        """The final pixel unshuffle needs an even count after one padding frame, i.e. an odd count before it."""
        for _ in self.config.encoder.down_sampling_layer:
            frames = (frames - 1) // 2 + 1
        return frames % 2 == 1

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[2] != self.config.z_channels:
            raise ValueError(f"VAE latents must be (batch, frames, {self.config.z_channels}, h, w), "
                             f"got {tuple(z.shape)}")
