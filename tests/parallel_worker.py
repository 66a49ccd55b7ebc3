"""One rank of the parallel tests (test_parallel.py starts WORLD_SIZE of these with torchrun's environment).

argv: out_dir model_dir... ; for each model folder (T2V or TI2V) and each mode that fits the world size, denoises
random embeddings (and TI2V condition latents) for a few steps through ParallelRuntime and saves this rank's final latents to
out_dir/<folder index>-<mode>-rank<r>.pt. `--hang-after-steps N`: rank 1 stops answering after N steps.
"""
import os
import sys
import time
from pathlib import Path

import torch

from lowvram_stepvideo.engines import parallel
from lowvram_stepvideo.loading.model_folder import ModelFolder
from lowvram_stepvideo.pipeline.parallel_machine import ParallelRuntime
from lowvram_stepvideo.pipeline.phases import PhasePipeline
from lowvram_stepvideo.profiles import load_profile
from lowvram_stepvideo.pipeline.sampling import flow_sigmas


def inputs(seed: int = 0, channels: int = 4, latent=(1, 5, 3, 5), text=(12, 96), clip=(6, 32)):
    """Embeddings of a guided pair (prompt lengths differ: the key mask matters) and initial latents."""
    g = torch.Generator().manual_seed(seed)
    y, clip_e = torch.randn((2,) + text, generator=g), torch.randn((2,) + clip, generator=g)
    mask = torch.ones(2, clip[0] + text[0])
    mask[1, clip[0] + 7:] = 0
    t, h, w = latent[1], latent[2], latent[3]
    latents = torch.randn((latent[0], t, channels, h, w), generator=g)
    return (y, mask, clip_e), latents


def denoise(folder: Path, runtime_for, steps: int = 2, step_callback=None) -> torch.Tensor:
    """A TI2V folder also gets condition latents (a random first latent frame, zeros after) and a motion score."""
    config = ModelFolder(folder, "bf16", False).open("transformer", layers=0).config
    mf = ModelFolder(folder, "bf16", False, config.kind)
    text = config.caption_channels
    embeds, latents = inputs(channels=config.in_channels, text=(12, text[0]), clip=(6, text[1]))
    condition = None
    if config.kind == "ti2v":
        condition = torch.zeros_like(latents)
        condition[:, :1] = torch.randn(latents[:, :1].shape, generator=torch.Generator().manual_seed(1))
    pipe = PhasePipeline(mf, load_profile("cpu"), progress=False, log=lambda m: None,
                             runtime=runtime_for(mf))
    with torch.no_grad():
        return pipe.denoise(embeds, latents, flow_sigmas(steps, 13.0), 9.0, step_callback=step_callback,
                            condition=condition, motion_score=7.0 if condition is not None else None)


def main(argv: list[str]) -> int:
    fault, after = None, None
    if argv[0] == "--hang-after-steps":
        fault, after, argv = argv[0], int(argv[1]), argv[2:]
    out, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    modes = ["cfg", "sequence"] if world == 2 else ["auto", "sequence"]
    for i, folder in enumerate(folders):
        for mode in modes:
            par = parallel.init_from_env(mode) if not parallel.dist.is_initialized() else None
            par = par or parallel.Parallel(parallel.layout_for(mode, world, int(os.environ["RANK"])),
                                           torch.device("cpu"))

            def hang(done, _latents):
                if fault and par.layout.rank == 1 and done == after:
                    time.sleep(3600)
            latents = denoise(folder, lambda mf: ParallelRuntime(mf, load_profile("cpu"), par),
                              step_callback=hang)
            torch.save(latents, out / f"{i}-{mode}-rank{par.layout.rank}.pt")
    parallel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
