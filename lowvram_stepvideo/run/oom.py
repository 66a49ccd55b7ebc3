"""Out of memory, in one line: what no fallback of the run handled (CUDA's OutOfMemoryError, or the CPU
allocator's RuntimeError for a size far beyond the machine's RAM) as OutOfMemory, a StepVideoError."""
from __future__ import annotations

import contextlib
import re

import torch

from ..errors import StepVideoError


class OutOfMemory(StepVideoError):
    """Out of memory at every preset of the ladder (or in the text encoders even streamed)."""


@contextlib.contextmanager
def one_line_oom():
    """An out-of-memory error no fallback handled (e.g. placing the VAE) as OutOfMemory with a one-line message."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        line = out_of_memory_line(e)
        if line is None:
            raise
        raise OutOfMemory(line) from None


def out_of_memory_line(e: BaseException) -> str | None:
    """The one line for an out-of-memory error: CUDA's, or the CPU allocator's (a RuntimeError "can't allocate
    memory": a size far beyond the machine's RAM); None for any other error."""
    text = str(e).strip()
    if isinstance(e, torch.OutOfMemoryError):
        what = text.splitlines()[0] if text else type(e).__name__
        return f"out of memory: {what}; use a smaller --profile or free GPU memory"
    if isinstance(e, RuntimeError) and "can't allocate memory" in text:
        tried = re.search(r"allocate (\d+) bytes", text)
        size = f" ({int(tried[1]) / 2**30:.1f} GiB at once)" if tried else ""
        return f"out of host memory{size}; choose a smaller size or fewer frames, or close other programs"
    return None
