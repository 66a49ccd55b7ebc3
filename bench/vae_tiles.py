"""VAE tiling: the decoder's extra work for each profile's tile setting, and the seam error against overlap.

    python bench/vae_tiles.py [--fixture DIR] [--json]

Part 1 (no weights): decoded area of all tiles over the frame's area (the decoder's convolutions dominate, so this
is its work relative to an untiled decode) for every profile's [vae] tile/overlap at 544x992 (34x62 latent pixels)
and 768x768 (48x48), with equal tiles (tiling.tile_spans) and, for comparison, the fixed-size tiles used before
(tiles of exactly `tile`, the last one flush with the end).

Part 2 (the fixture VAE, random weights, float32 on the CPU): one 3-latent chunk of random latents decoded untiled
and tiled with several overlaps; the error of the tiled decode, as mean / max absolute difference over the video
and relative to the untiled video's standard deviation. Random weights say how far the seams reach, not how
visible they are on real content.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowvram_stepvideo.loading.loaders import load_vae  # noqa: E402
from lowvram_stepvideo.profiles import list_profiles, load_profile  # noqa: E402
from lowvram_stepvideo.engines.tiling import decode_tiled, decode_untiled, tile_overhead  # noqa: E402

SIZES = {"544x992": (34, 62), "768x768": (48, 48)}
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "fixtures" / "tiny-public" / "model_dir" / "vae"


def fixed_tiles_overhead(size, tile: int, overlap: int) -> float:
    """The previous tiling: tiles of exactly `tile` every `tile - overlap`, the last one flush with the end."""
    area = 1.0
    for n in size:
        if tile >= n:
            continue
        starts = list(range(0, n - tile, tile - overlap)) + [n - tile]
        area *= len(starts) * tile / n
    return area


def overhead_rows() -> list[dict]:
    rows = []
    for name in list_profiles():
        vae = load_profile(name).vae
        for label, size in SIZES.items():
            tile = vae.tile or max(size)
            rows.append({"profile": name, "size": label, "tile": vae.tile, "overlap": vae.overlap,
                         "overhead": round(tile_overhead(size, tile, vae.overlap), 3),
                         "overhead_fixed_tiles": round(fixed_tiles_overhead(size, tile, vae.overlap), 3)})
    return rows


def seam_rows(folder: Path, h: int, w: int, tile: int, overlaps: list[int]) -> list[dict]:
    torch.manual_seed(0)
    vae = load_vae(folder, torch.float32)
    z = torch.randn(1, 3, vae.config.z_channels, h, w)
    with torch.no_grad():
        start = time.perf_counter()
        plain = decode_untiled(vae.decode_chunk, z)
        seconds = time.perf_counter() - start
        rows = [{"tile": "untiled", "overlap": 0, "seconds": round(seconds, 2), "mean_abs": 0.0, "max_abs": 0.0}]
        for overlap in overlaps:
            start = time.perf_counter()
            tiled = decode_tiled(vae.decode_chunk, z, tile, overlap)
            diff = (tiled - plain).abs()
            rows.append({"tile": tile, "overlap": overlap, "seconds": round(time.perf_counter() - start, 2),
                         "mean_abs": diff.mean().item(), "max_abs": diff.max().item(),
                         "overhead": round(tile_overhead((h, w), tile, overlap), 3)})
    scale = plain.std().item()
    for row in rows:
        row["mean_rel"], row["max_rel"] = row["mean_abs"] / scale, row["max_abs"] / scale
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixture", type=Path, default=FIXTURE, help="a VAE folder (default: the tiny fixture's)")
    p.add_argument("--latent", default="12x16", help="latent size h x w of the seam test (default 12x16)")
    p.add_argument("--tile", type=int, default=8, help="tile of the seam test, latent pixels (default 8)")
    p.add_argument("--overlaps", default="0,1,2,3,4", help="overlaps of the seam test")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.latent.split("x"))
    result = {"overhead": overhead_rows(),
              "seams": seam_rows(args.fixture, h, w, args.tile, [int(v) for v in args.overlaps.split(",")])}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{'profile':<12} {'size':<8} {'tile':>4} {'overlap':>7} {'equal tiles':>11} {'fixed tiles':>11}")
    for r in result["overhead"]:
        print(f"{r['profile']:<12} {r['size']:<8} {r['tile']:>4} {r['overlap']:>7} {r['overhead']:>10.2f}x "
              f"{r['overhead_fixed_tiles']:>10.2f}x")
    print(f"\nseams: fixture VAE, latents 1x3x{h}x{w}, tiled vs untiled (relative = / std of the untiled video)")
    print(f"{'tile':>8} {'overlap':>7} {'mean rel':>9} {'max rel':>8} {'work':>6} {'seconds':>8}")
    for r in result["seams"]:
        print(f"{r['tile']:>8} {r['overlap']:>7} {r['mean_rel']:>9.4f} {r['max_rel']:>8.4f} "
              f"{r.get('overhead', 1.0):>5.2f}x {r['seconds']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
