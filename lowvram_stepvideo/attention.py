"""Attention backends, chosen per model from outside: `use_attention_backend(model, "sage")`.

Every backend takes q (B, Sq, H, D), k and v (B, Sk, H, D) and an optional boolean key mask (B, Sk) (True = attend;
the same keys for every query, which is all the DiT needs) and returns (B, Sq, H, D). Scale is 1/sqrt(D).
- "sdpa":  torch.nn.functional.scaled_dot_product_attention (default; any device and dtype).
- "flash": flash-attn 3 (`flash_attn_interface`) or 2 (`flash_attn`); CUDA, fp16/bf16.
- "sage":  SageAttention (`sageattention.sageattn`, int8 QK); CUDA, fp16/bf16.
flash and sage take no mask: a masked call runs them per batch element over the selected keys, which is exact.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

import torch
from torch import nn

from .models.layers import sdpa

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage")
INSTALL_HINT = {"flash": "pip install flash-attn", "sage": "pip install sageattention"}


@functools.cache
def _kernel(name: str) -> Callable | None:
    """The unmasked (B, S, H, D) kernel of an optional package, or None when it cannot be imported."""
    candidates = {"flash": [("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func")],
                  "sage": [("sageattention", "sageattn")]}[name]
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr)
        except Exception:  # ImportError, or a broken CUDA extension failing at import
            continue
    return None


def is_available(name: str) -> bool:
    return name == "sdpa" or (name in BACKENDS and _kernel(name) is not None)


def _run_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {name!r} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
                         "run the DiT in bf16 on a GPU or use backend 'sdpa'")
    fn = _kernel(name)
    out = fn(q, k, v, tensor_layout="NHD", is_causal=False) if name == "sage" else fn(q, k, v, causal=False)
    return out[0] if isinstance(out, tuple) else out  # flash-attn 3 may return (out, lse)


def _masked_kernel(name: str, q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Keys are masked the same for every query, so attending over only the kept keys is exact."""
    outs = []
    for b in range(q.shape[0]):
        keep = mask[b]  # (Sk,) bool
        outs.append(_run_kernel(name, q[b:b + 1], k[b:b + 1, keep], v[b:b + 1, keep]))
    return torch.cat(outs, dim=0)  # (B, Sq, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa") -> torch.Tensor:
    """q (B, Sq, H, D), k/v (B, Sk, H, D), mask (B, Sk) bool or None -> (B, Sq, H, D)."""
    if backend == "sdpa":
        return sdpa(q, k, v, mask)
    check_backend(backend)
    if mask is None:
        return _run_kernel(backend, q, k, v)
    return _masked_kernel(backend, q, k, v, mask)


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not is_available(name):
        raise ValueError(f"attention backend {name!r} is not importable here; install it ({INSTALL_HINT[name]}) "
                         "or use 'sdpa'")


def resolve_backend(name: str, fallback: bool = False) -> str:
    """`name` if usable; with `fallback`, an unavailable optional backend becomes 'sdpa' with a warning.
    "auto" is the fastest importable one (flash, then sage, then sdpa)."""
    if name == "auto":
        return next((b for b in ("flash", "sage") if is_available(b)), "sdpa")
    if fallback and name in BACKENDS and not is_available(name):
        log.warning("attention backend %r is not importable (%s); using 'sdpa'", name, INSTALL_HINT[name])
        return "sdpa"
    check_backend(name)
    return name


def use_attention_backend(model: nn.Module, name: str, fallback: bool = False) -> str:
    """Point every attention module of `model` (those with an `attend` attribute) at backend `name`.
    Returns the backend actually used (differs from `name` only with `fallback`)."""
    name = resolve_backend(name, fallback)
    fn = sdpa if name == "sdpa" else functools.partial(attention, backend=name)
    found = [m for m in model.modules() if hasattr(m, "attend")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with an 'attend' attribute")
    for m in found:
        m.attend = fn
    return name
