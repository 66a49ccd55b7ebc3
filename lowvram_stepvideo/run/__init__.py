"""One job end to end: the checks before any heavy work (preflight), the preset ladder and the step-down on
out-of-memory, resume checkpoints (resume), and what a run writes: the video, its sidecar and their names (outputs).

May import planning, pipeline, engines, loading, models, files and the root modules.
"""
