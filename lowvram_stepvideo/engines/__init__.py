"""Mechanisms that change how the networks run, not what they compute: block streaming and its host store
(streaming, host_store), attention kernels, fast matmuls, the step cache, regional compile, VAE tiling, CFG and
sequence parallel, and the DiT's speed levers that combine them (levers). Each attaches to a module through one
registry (attach) and detaches exactly.

May import loading, models, files and the root modules.
"""
