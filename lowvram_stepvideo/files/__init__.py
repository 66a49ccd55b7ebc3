"""Reading and writing files with no knowledge of the networks: safetensors weights (weights), the
release's configs (configs), tokenizers, caches and the text-embedding cache, atomic file helpers (fsutil), the
video writer (video), the animated preview written beside the video while it is made (preview_file) and the
published releases' shapes that ship with the package (releases).

May import only the root modules (errors, profiles, defaults).
"""
