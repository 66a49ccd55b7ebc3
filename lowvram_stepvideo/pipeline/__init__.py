"""The phases of a generation (text, denoise, decode) and the sampling math, run against a machine
runtime: the pipeline's only way to the device (machine), with a real implementation and the planner's. Progress
reporting lives here too, and so do previews while denoising (preview) and the VAE's latent-to-RGB map they
use (preview_map).

May import engines, loading, models, files and the root modules; the phases themselves (phases.py) import no
engine and reach the machine only through the runtime.
"""
