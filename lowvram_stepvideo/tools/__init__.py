"""Programs beside generation: converting a release folder to int8 / fp8 (quantize_folder, behind quantize.py).

May import every layer below face (it stands on face's floor): run, planning, pipeline, engines, loading,
models, files and the root modules.
"""
