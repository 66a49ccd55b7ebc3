"""The networks of a memory plan: each as a run would load it (dtypes, quantized layers), data-free on "meta",
with one block per stack (identical blocks are the same size), and the shape of the whole network in the engines'
terms (`ModelShape`). Attention runs on a stand-in for the kernel the target card will use for the compute dtype
(engines/attention.planned_kernel): a fused kernel allocates only its output; where the card has none for the dtype
(bf16 on Turing), PyTorch's SDPA runs its math kernel, which materialises the scores."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import quant
from ..loading.assign import run_dtype
from ..loading.model_folder import ModelFolder
from ..engines.attention import output_only
from ..engines.host_store import BlockLayout, block_tensors
from ..engines.placement import BLOCK_STACKS


@dataclass(frozen=True)
class ModelShape:
    """What placing a network can hold, in the engines' terms: a stack of `blocks` identical blocks (each
    `block_bytes` in a streaming slot, `block_tensor_bytes` as separate tensors) and `other_bytes` of the rest, of
    which `mapped_table_bytes` are embedding tables loaded as stored (no cast): on a CPU device they stay the
    checkpoint's memory map, and a run reads only the rows it looks up (a few MiB of a 0.75 GiB step_llm table)."""
    blocks: int = 0
    block_bytes: int = 0
    block_tensor_bytes: int = 0
    other_bytes: int = 0
    mapped_table_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + self.blocks * self.block_tensor_bytes

    def held_other_bytes(self, device: str) -> int:
        """The weights outside the stack that placing the network on `device` ("cuda" | "cpu") puts in memory."""
        return self.other_bytes - (self.mapped_table_bytes if device == "cpu" else 0)


def planned_model(folder: ModelFolder, component: str, dtype: torch.dtype,
                  blocks: int = 1, attend=output_only) -> tuple[nn.Module, ModelShape]:
    """`component` with the tensors (dtypes, quantized layers) a run would load, data-free on "meta", `blocks`
    blocks per stack, attention on `attend` (the DiT's kernel is attached over it with its levers, as in a run),
    and the shape of the whole network. An assumed-format folder (assumed_format.py) plans as its quantized
    version: its weight index carries the scheme."""
    opened = folder.open(component, layers=blocks) if component in BLOCK_STACKS else folder.open(component)
    module = opened.module
    keep = _quantize_as_run(module, opened.source.metadata)
    stored = module.state_dict(keep_vars=True)
    state = {name: torch.empty(t.shape, dtype=run_dtype(t.dtype, dtype, name in keep), device="meta")
             for name, t in stored.items()}
    module.load_state_dict(state, strict=True, assign=True)
    module.eval().requires_grad_(False)
    for m in module.modules():
        if hasattr(m, "attend"):
            m.attend = attend
    source = opened.source
    uncast = {name for name in stored if name in source.keys() and source.ref(name).dtype == state[name].dtype}
    return module, _shape(module, component, opened.config, uncast)


def _quantize_as_run(module: nn.Module, metadata: dict) -> set[str]:
    """Swap in the quantized layers a quantized folder records; the names keeping their stored dtype."""
    if quant.SCHEME_KEY not in metadata:
        return set()
    scheme = quant.Scheme.from_metadata(metadata)
    built = {name: kind for name, kind in scheme.tensors.items() if _has_module(module, name)}   # one block
    quant.swap_modules(module, built, scheme.fmt)
    return quant.stored_dtype_names(module)


def _has_module(module: nn.Module, weight_name: str) -> bool:
    try:
        module.get_submodule(weight_name.removesuffix(".weight"))
        return True
    except AttributeError:
        return False


def _shape(module: nn.Module, component: str, config, uncast: set[str]) -> ModelShape:
    """`uncast`: the names of the tensors a run loads in their stored dtype."""
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    stack = BLOCK_STACKS.get(component)
    tables = sum(m.weight.nbytes for name, m in module.named_modules() if isinstance(m, nn.Embedding)
                 and f"{name}.weight" in uncast and not (stack and name.startswith(stack + ".")))
    if stack is None:
        return ModelShape(other_bytes=total, mapped_table_bytes=tables)
    blocks = module.get_submodule(stack)
    block = sum(t.numel() * t.element_size() for _, t in block_tensors(blocks[0]))
    return ModelShape(config.num_layers, BlockLayout(blocks[0]).nbytes, block, total - len(blocks) * block, tables)
