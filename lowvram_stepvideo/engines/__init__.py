"""Mechanisms that change how the networks run, not what they compute: whole networks placed on the device or their
blocks streamed (placement, streaming, and the host side: block_store, host_store), attention kernels, fast matmuls,
the step cache, regional compile, VAE tiling (and the decoded frames' copies out: frame_copies), CFG and sequence
parallel, and the DiT's speed levers that combine them (levers). Each attaches to a module through one registry
(attach), which enforces the order between them, and detaches exactly. The kernel choices take the card they choose
for (cards): a run's device, or the card a memory plan is for. A run probes its kernels on the device before
choosing them (probes), runs attention in float16 where the card has no fused kernel for the compute dtype, and
falls back to SDPA at a call site whose kernel fails mid-run (attention_paths).

May import loading, models, files and the root modules.
"""
