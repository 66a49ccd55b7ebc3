"""Regional torch.compile of a block stack (opt-in: `--compile`).

Every block's `forward` becomes one shared compiled function of the block's class (`torch.compile` of
`Block.forward`, the block passed as an argument), so the module's own `__call__` (and with it the hooks of the
block streamer, the step cache's loop, the transfers) stays outside the compiled region. Blocks are identical, and
since torch 2.5 dynamo treats a module's parameters as inputs (`inline_inbuilt_nn_modules`), so one graph serves
all blocks and all steps: no recompiles across blocks or steps (tests/test_compile.py checks dynamo's counters).
A new sequence length (another preset) compiles once more. Needs a C++ compiler on the CPU and Triton on CUDA.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .attach import Handle, attaching

_COMPILED: dict[tuple[type, str], object] = {}


def compiled_forward(cls: type, backend: str = "inductor"):
    """The one compiled `cls.forward` shared by every block of that class."""
    if (cls, backend) not in _COMPILED:
        _COMPILED[cls, backend] = torch.compile(cls.forward, dynamic=False, backend=backend)
    return _COMPILED[cls, backend]


def compile_blocks(blocks: nn.ModuleList, backend: str = "inductor") -> Handle:
    """Route each block's forward through its class's compiled forward; the handle's detach gives the blocks their
    own forward back. `backend`: a torch.compile backend ("inductor" generates kernels; "aot_eager" only traces,
    for tests)."""
    with attaching(blocks, "compile") as handle:
        for block in blocks:
            handle.set(block, "forward", functools.partial(compiled_forward(type(block), backend), block))
    return handle
