"""Weights into modules: build a network on the meta device, match a weight file's tensors to it strictly (a
quantized folder's linears swapped first, as its metadata says), and assign memory-mapped tensors. All key
remapping between files and modules happens here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..files.weights import FLOAT_DTYPES, CheckpointError, TensorRef, WeightSource, check_finite
from ..models import quant


class _SkipRandomInit(TorchFunctionMode):
    """Parameter init is wasted on meta tensors, and the first `normal_` on meta costs seconds (torch builds its
    decompositions); nn.Embedding's init calls it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init.normal_ passes it by keyword
        if getattr(func, "__name__", None) == "normal_" and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"), _SkipRandomInit():
        return factory()


def match_weights(module: nn.Module, source: WeightSource,
                  rename: Callable[[str], str | None] = lambda k: k) -> dict[str, str]:
    """Check `source` against `module` strictly (names and shapes) without reading data.

    Returns module key -> file key. `rename` maps a file key to a module key (None drops it). A quantized source
    first swaps the module's linears to the scheme its metadata records.
    """
    keep = _attach_quantization(module, source)
    wanted = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    found = {}
    for key in source.keys():
        new = rename(key)
        if new is not None:
            found[new] = key
    missing = [k for k in wanted if k not in found]
    if missing:
        raise CheckpointError(f"{source.label}: missing tensor {missing[0]} (shape {list(wanted[missing[0]])})"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                              "re-download the weights, or use the config.json that came with them")
    unexpected = [found[k] for k in found if k not in wanted]
    if unexpected:
        raise CheckpointError(f"{source.label}: unexpected tensor {unexpected[0]} in "
                              f"{source.ref(unexpected[0]).file.name}; wrong folder, or use the config.json that "
                              "came with these weights")
    dtypes = {k: v.dtype for k, v in module.state_dict(keep_vars=True).items()}
    for name, shape in wanted.items():
        ref = source.ref(found[name])
        if ref.shape != shape:
            raise CheckpointError(f"{ref.file}: tensor {found[name]} has shape {list(ref.shape)}, the config "
                                  f"expects {list(shape)}; config.json does not match the weights (use the one "
                                  "that came with them)")
        _check_dtype(ref, found[name], dtypes[name] if name in keep else None)
    return {name: found[name] for name in wanted}


def _check_dtype(ref: TensorRef, key: str, stored: torch.dtype | None) -> None:
    """Quantized codes and scales must have the scheme's dtype, every other tensor a float dtype."""
    ok = ref.dtype == stored if stored is not None else ref.dtype in FLOAT_DTYPES
    if not ok:
        want = str(stored).removeprefix("torch.") if stored is not None else "bf16, f16 or f32"
        raise CheckpointError(f"{ref.file}: tensor {key} is stored as {str(ref.dtype).removeprefix('torch.')}, "
                              f"expected {want}; the file is corrupt or not a Step-Video checkpoint, re-download "
                              "it (or re-run quantize.py)")


def load_weights(module: nn.Module, source: WeightSource, dtype: torch.dtype,
                 rename: Callable[[str], str | None] = lambda k: k,
                 reader: Callable[[TensorRef], torch.Tensor] | None = None) -> nn.Module:
    """Strictly match `source` to `module`, then assign memory-mapped tensors (built-on-meta modules).

    Floating tensors are cast to `dtype` (a no-op view when the file already has it); integer and fp8 tensors
    (quantized weights) and the float32 scales of quantized linears are kept as stored. `reader` replaces the
    memory-mapped read (the memory planner passes one that makes data-free tensors).
    """
    keys = match_weights(module, source, rename)
    keep = _attach_quantization(module, source)  # already swapped by match_weights; names keeping their dtype
    state = {}
    for name, key in keys.items():
        ref = source.ref(key)
        target = run_dtype(ref.dtype, dtype, name in keep)
        if reader is not None:
            t = reader(ref)
        else:   # a cast copies anyway: read it without keeping mapped pages
            t = source.read(key) if target != ref.dtype else source.tensor(key)
            check_finite(t, ref, key)
        state[name] = t.to(target)
    module.load_state_dict(state, strict=True, assign=True)
    module.weight_refs = {name: source.ref(key) for name, key in keys.items()}  # where each tensor lives on disk
    return module.eval().requires_grad_(False)


def run_dtype(stored: torch.dtype, dtype: torch.dtype, keep: bool) -> torch.dtype:
    """The dtype a stored tensor runs in: floating tensors wider than a byte take the compute `dtype`; integer and
    fp8 tensors, and those to `keep` (quantized codes, linear scales), stay as stored."""
    return dtype if stored.is_floating_point and stored.itemsize > 1 and not keep else stored


def _attach_quantization(module: nn.Module, source: WeightSource) -> set[str]:
    """A quantized folder records its scheme in the safetensors metadata; swap the module's linears to match.
    Idempotent. Returns the state-dict names that keep their stored dtype (empty for a float folder)."""
    if quant.SCHEME_KEY not in source.metadata:
        return set()
    return quant.prepare_module(module, source.metadata)
