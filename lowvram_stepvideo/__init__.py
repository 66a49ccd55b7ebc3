"""lowvram_stepvideo: Step-Video-T2V and Step-Video-TI2V on one GPU. The public names are loaded on first use, so
`import lowvram_stepvideo` (and generate.py --help) does not import torch:

    StepVideoPipeline   the Python API (face/api.py)
    StepVideoError      the one exception type every one-line error derives from (errors.py)
    JobSpec, JobQueue   one video's request, and the queue that runs them one at a time (run/preflight.py, face/job_queue.py)
    prepare_first_image the first image as a Step-Video-TI2V model sees it (pipeline/conditioning.py)
"""
from __future__ import annotations

import importlib

_PUBLIC = {"StepVideoPipeline": "face.api", "StepVideoError": "errors", "JobSpec": "run.preflight",
           "JobQueue": "face.job_queue", "prepare_first_image": "pipeline.conditioning"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
