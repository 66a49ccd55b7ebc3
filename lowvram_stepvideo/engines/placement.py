"""Whole networks on the compute device for a phase, through the attach registry (attach.py): all weights
(`to_device`, mechanism "placement"), or the block stack streamed by a BlockStreamer and the other weights on the
device (`attach_streaming`, mechanism "streaming"); `offload_component` takes either off. Also the block stacks of
the networks (`BLOCK_STACKS`, one table for the runtime and the planner) and the device's memory report.
"""
from __future__ import annotations

import torch
from torch import nn

from .attach import attaching, detach_all, handle_of
from .streaming import GiB, BlockStreamer

# Each network's stack of identical blocks (component -> module path); the DiT's and step_llm's can be streamed.
BLOCK_STACKS = {"transformer": "transformer_blocks", "step_llm": "transformer.layers", "hunyuan_clip": "encoder.layer"}
STREAMED_STACKS = ("transformer", "step_llm")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The block stack of a DiT (`transformer_blocks`) or step_llm (`transformer.layers`) and its key prefix."""
    paths = [BLOCK_STACKS[c] for c in STREAMED_STACKS]
    for path in paths:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise ValueError(f"{type(model).__name__} has no block list ({' or '.join(paths)}) to stream")


def attach_streaming(model: nn.Module, device, resident=0, prefetch: int = 1, source: str = "ram",
                     pin_budget_bytes: int | None = None, **options) -> BlockStreamer:
    """Stream `model`'s blocks to `device` and put every other weight there; `offload_component(model)` undoes
    both. `options` go to BlockStreamer (cyclic, keep_log...). The engine's `footprint()` includes those other
    weights."""
    path, blocks = find_blocks(model)
    engine = BlockStreamer(blocks, device, resident=resident, prefetch=prefetch, source=source,
                           pin_budget_bytes=pin_budget_bytes, weight_refs=getattr(model, "weight_refs", None),
                           prefix=path + ".", **options)
    with attaching(model, "streaming") as handle:
        host: dict[str, torch.Tensor] = {}

        def take_off(discard: bool) -> None:
            engine.detach(discard=discard)
            _give_back(model, host, discard)
        handle.on_detach(take_off)
        engine.attach()
        engine.other_bytes = _place(model, device, host, skip=path)
    handle.value, handle.host, handle.path = engine, host, path
    return engine


def park(model: nn.Module) -> None:
    """Take a placed model off the device but keep it placeable (a model kept between runs): a streamed stack is
    suspended (its packed host copies kept) and its other weights get their host tensors back; a model placed
    whole gets its host tensors back (`offload_component`). `unpark` puts it on the device again."""
    handle = handle_of(model, "streaming")
    if handle is None:
        offload_component(model)
        return
    handle.value.suspend()
    _give_back(model, handle.host, discard=False)


def unpark(model: nn.Module, device) -> None:
    """On the device again after `park`: a suspended stack resumed (nothing read or packed again), the other
    weights placed; a model that was placed whole goes whole (`to_device`)."""
    handle = handle_of(model, "streaming")
    if handle is None:
        to_device(model, device)
        return
    handle.value.resume()
    _place(model, device, handle.host, skip=handle.path)


def parked_stream(model: nn.Module) -> BlockStreamer | None:
    """The suspended block streamer of a parked model, if it has one."""
    handle = handle_of(model, "streaming")
    return handle.value if handle is not None and handle.value.suspended else None


def to_device(module: nn.Module, device) -> int:
    """Put all of a component's weights on `device`; returns their bytes. The host tensors are kept, so
    `offload_component` costs no copy; weights must not be modified meanwhile."""
    with attaching(module, "placement") as handle:
        host: dict[str, torch.Tensor] = {}
        handle.on_detach(lambda discard: _give_back(module, host, discard))
        handle.value = _place(module, device, host)
    return handle.value


def offload_component(module: nn.Module, discard: bool = False) -> None:
    """Take a component off the device: its block streamer detached, its weights given their host tensors back.
    `discard`: the component is about to be thrown away; every mechanism still on it comes off too, and every
    weight is dropped instead (arenas and slots first, nothing copied back), leaving the module empty."""
    if discard:
        detach_all(module, discard=True)
    for mechanism in ("streaming", "placement"):
        handle = handle_of(module, mechanism)
        if handle is not None:
            handle.detach()
    _give_back(module, {}, discard)      # a weight left on the device some other way goes back (or is dropped)


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _place(module: nn.Module, device, host: dict, skip: str | None = None) -> int:
    """Weights of `module` (except those under `skip`) to `device`, their host tensors kept in `host`."""
    device = torch.device(device)
    placed = 0
    for name, t in _named_tensors(module):
        if skip is not None and name.startswith(skip + "."):
            continue
        host.setdefault(name, t.data)
        t.data = t.data.to(device)
        placed += t.numel() * t.element_size()
    return placed


def _give_back(module: nn.Module, host: dict, discard: bool) -> None:
    for name, t in _named_tensors(module):
        if discard:
            t.data = torch.empty(0, dtype=t.dtype)
        elif name in host:
            t.data = host[name]
        elif t.device.type != "cpu":
            t.data = t.data.to("cpu")


def device_memory(device) -> dict[str, int] | None:
    """Bytes allocated / reserved / peak / total on a CUDA device; None on a CPU (nothing to report)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "peak": torch.cuda.max_memory_allocated(device),
            "total": torch.cuda.get_device_properties(device).total_memory}


def device_memory_report(device) -> str:
    mem = device_memory(device)
    if mem is None:
        return f"{torch.device(device)}: device memory n/a"
    return (f"{torch.device(device)}: {mem['allocated'] / GiB:.2f} GiB allocated, {mem['reserved'] / GiB:.2f} GiB "
            f"reserved, peak {mem['peak'] / GiB:.2f} GiB of {mem['total'] / GiB:.2f} GiB")
