"""Reading and writing files with no knowledge of the networks: safetensors weights (weights), the
release's configs (configs), tokenizers, caches and the text-embedding cache, atomic file helpers (fsutil) and the
video writer (video).

May import only the root modules (errors, profiles, defaults).
"""
