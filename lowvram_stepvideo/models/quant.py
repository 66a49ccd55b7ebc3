"""Weight-only int8 / fp8 quantization: the scheme, quantize/dequantize, and the module swap.

Scheme (version 1), recorded as JSON under `lowvram_quant` (the bare format name also under
`lowvram_quant_format`) in the `__metadata__` of every safetensors file of a quantized component: a weight W
(rows, cols) of an `nn.Linear` or `nn.Embedding` named `<m>` is stored as `<m>.weight` (int8; fp8 e4m3fn for
linears in the fp8 format) plus `<m>.scale` (float32, one per row, i.e. per output channel or per token),
W ~ weight * scale[:, None]. scale = max|row| / 127 (int8: symmetric, round to nearest) or max|row| / 448 (fp8:
the cast rounds). All-zero rows get scale 1 and codes 0, so no NaN/inf. Biases and all other tensors keep the
release dtype. The quantized modules dequantize to the activation dtype inside forward; a linear's scale stays
float32 until then, an embedding's scale is cast to the model dtype at load (an embedding has no floating input
to take the dtype from, so its scale's dtype is the output dtype).

What is quantized (`QUANTIZE_RULES`) was decided by measurement on the tiny-public fixture models (float32
compute; relative Frobenius error against the float32 reference: DiT `out.x`, step_llm `y` on unmasked tokens,
CLIP last hidden state; int8 / fp8) and by the size budget (quantized DiT and step_llm within 1% of half their bf16
size, at full size and for the 4-layer DiT slice of bench/quantize_memory.py):

| quantized set                                        | int8   | fp8    |
|------------------------------------------------------|--------|--------|
| DiT, bf16 compute without quantization (for scale)   | 0.76%  |        |
| DiT block linears only                               | 0.80%  | 2.86%  |
|   + adaln_single.linear                              | 0.97%  | 3.00%  |
|   + timestep_embedder.linear_2                       | 0.91%  | 3.39%  |
|   + caption_projection.linear_1                      | 0.77%  | 2.86%  |
|   + caption_projection.linear_2                      | 0.85%  | 3.07%  |
|   + timestep_embedder.linear_1 (kept bf16)           | 0.82%  | 3.36%  |
|   + clip_projection (kept bf16)                      | 0.85%  | 3.08%  |
|   + proj_out (kept bf16)                             | 1.17%  | 4.78%  |
| DiT policy (blocks + the four above)                 | 1.13%  | 3.65%  |
| DiT every linear                                     | 1.51%  | 5.34%  |
| step_llm, bf16 compute without quantization          | 0.79%  |        |
| step_llm linears only                                | 1.57%  | 6.26%  |
| step_llm policy (+ word embedding, int8 per token)   | 1.89%  | 6.39%  |
| step_llm word embedding alone: int8 / fp8 per token  | 1.04%  | 4.38%  |
| CLIP encoder linears (optional, not the default)     | 0.72%  | 3.14%  |
| TI2V DiT (ti2v-public), T2V's policy                 | 0.94%  | 4.28%  |
|   + motion_score_embedder.linear_2 (TI2V policy)     | 1.08%  | 3.98%  |
|   + motion_score_embedder.linear_1 (kept bf16)       | 1.14%  | 4.79%  |

proj_out (D -> 64, the velocity itself) hurts most and stays bf16, as do the other small input projections
(timestep linear_1 256 -> D, clip_projection 1024 -> D, the 1x1 conv pos_embed): together 9 M params at full size,
nothing to gain. adaln_single.linear (36864x6144, 0.45 GB), timestep linear_2 and both caption projections are
quantized although they add error: in bf16 they would put the full DiT 1.25% and the 4-layer slice 12.7% above
half (with them quantized: +0.09% and +0.38%). Step-Video-TI2V's DiT adds a motion-score embedding of the same
shapes as the timestep's; its linear_2 (6144x6144) is quantized like the timestep's for the same reason (in bf16 it
alone would add 1% of half to the 4-layer slice), its linear_1 stays bf16.
The step_llm word embedding (65536x6144, 0.8 GB) is quantized for the same reason (bf16 would put the step_llm
2.1% above half; quantized: +0.06%), always as int8 rows with one scale per token, also in the fp8 format: a lookup gains nothing
from fp8, and fp8 rows cost 4.4% error against int8's 1.0%. CLIP (0.35 B params, run once per prompt) is only
converted from its pickle to safetensors (float32, exact) unless `--components` names hunyuan_clip.

Granularity is per output channel. Finer groups would not fit the size budget (group 128 with float32 scales adds
3.1% of the int8 size, bf16 scales 1.6%) and pay little: group-128 fake-quantization gives 0.93% / 3.44% on the DiT
(per channel: 1.13% / 3.65%); groups of 32 on the step_llm embedding alone take its share from 1.04% to 0.86%.
Dequantization is float32 math rounded once into one buffer of the activation dtype (the scale is never rounded
to bf16 first), a piece of rows at a time so the only float32 temporary is small. A linear called once per token
run (the FFN and attention output projections under `set_token_chunk`) would expand its weight once per run;
`keep_expanded_weights` (an engine attached from outside) keeps each expansion for the duration of one call of the
module that makes those runs. Fast int8 x int8 / fp8 x fp8 matmuls, which also quantize the activations, are a
separate lever in `fast_matmul.py` (set as `QuantLinear.matmul`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..files.weights import CheckpointError

SCHEME_KEY = "lowvram_quant"
FORMAT_KEY = "lowvram_quant_format"
SCHEME_VERSION = 1
SCALE_SUFFIX = ".scale"
DEFAULT_COMPONENTS = ("transformer", "step_llm")   # what quantize.py converts unless told (CLIP costs 0.72%)


@dataclass(frozen=True)
class QFormat:
    name: str
    dtype: torch.dtype
    qmax: float     # largest code magnitude


FORMATS = {"int8": QFormat("int8", torch.int8, 127.0), "fp8": QFormat("fp8", torch.float8_e4m3fn, 448.0)}
EMBEDDING_FORMAT = FORMATS["int8"]  # a table lookup gains nothing from fp8 and int8 rows are 4x more precise

# weight tensors quantized per component, by role (see the module docstring); everything else keeps its dtype
QUANTIZE_RULES: dict[str, list[tuple[str, str]]] = {
    "transformer": [
        (r"transformer_blocks\.\d+\.(attn1\.(wqkv|wo)|attn2\.(wq|wkv|wo)|ff\.net\.0\.proj|ff\.net\.2)\.weight",
         "linear"),
        (r"adaln_single\.linear\.weight", "linear"),
        (r"adaln_single\.emb\.(timestep|motion_score)_embedder\.linear_2\.weight", "linear"),
        (r"caption_projection\.linear_[12]\.weight", "linear"),
    ],
    "step_llm": [
        (r"transformer\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[12])\.weight", "linear"),
        (r"tok_embeddings\.word_embeddings\.weight", "embedding"),
    ],
    "hunyuan_clip": [
        (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
         r"|output\.dense)\.weight", "linear"),
    ],
}


def get_format(name: str) -> QFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization format {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]


def plan_quantization(component: str, names) -> dict[str, str]:
    """Weight tensor name -> 'linear' | 'embedding' for the tensors of `component` that get quantized."""
    rules = [(re.compile(pattern), kind) for pattern, kind in QUANTIZE_RULES[component]]
    plan = {}
    for name in names:
        kind = next((k for pattern, k in rules if pattern.fullmatch(name)), None)
        if kind is not None:
            plan[name] = kind
    return plan


def scale_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + SCALE_SUFFIX


# ---------------------------------------------------------------- math

@torch.no_grad()
def quantize_rows(w: torch.Tensor, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, cols) float -> codes (rows, cols) in fmt.dtype, scale (rows,) float32, w ~ codes * scale[:, None].

    Rows are independent, so a caller may quantize a large weight a block of rows at a time. `w` is not modified."""
    if w.shape[1]:
        amax = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # exact in w's own dtype, no float32 copy
    else:
        amax = torch.zeros(w.shape[0], device=w.device)
    if not torch.isfinite(amax).all():
        raise ValueError("weight holds inf or NaN values; the checkpoint is corrupt")
    scale = amax / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero (or underflowing) rows: codes 0
    scaled = w.to(torch.float32, copy=True).div_(scale[:, None])  # (a mixed-dtype div is 4x slower on CPU)
    if not fmt.dtype.is_floating_point:
        scaled.round_()
    return scaled.clamp_(-fmt.qmax, fmt.qmax).to(fmt.dtype), scale


DEQUANT_PIECE = 2**22     # elements of float32 scratch per piece of rows (16 MiB)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (rows, cols), scale (rows,) -> (rows, cols) in `dtype`: each element is code * scale computed in float32
    (exact for int8 and e4m3 codes times a float32 scale, up to float32 rounding) and rounded once to `dtype`."""
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    scale = scale.float()[:, None]                       # (rows, 1); a bf16 scale (embeddings) converts exactly
    step = max(1, DEQUANT_PIECE // max(1, codes.shape[1]))
    for r in range(0, codes.shape[0], step):
        torch.mul(codes[r:r + step].float(), scale[r:r + step], out=out[r:r + step])
    return out


# ---------------------------------------------------------------- modules

def _frozen(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class QuantLinear(nn.Module):
    """Linear layer with int8/fp8 weight (out, in) and float32 per-output-channel scale (out,).

    Set from outside: `matmul` (a fast low-precision kernel, see fast_matmul.py; it returns None for inputs it does
    not take) and `keep_expanded` (see `keep_expanded_weights`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QFormat, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.weight = _frozen((out_features, in_features), fmt.dtype, device)
        self.scale = _frozen((out_features,), torch.float32, device)
        self.register_parameter("bias", _frozen((out_features,), torch.float32, device) if bias else None)
        self.matmul = None
        self.keep_expanded = False
        self.kept: torch.Tensor | None = None    # the expanded weight while keep_expanded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.matmul is not None:
            out = self.matmul(x, self.weight, self.scale, bias)
            if out is not None:
                return out
        return F.linear(x, self.expanded_weight(x.dtype), bias)

    def expanded_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`. Under torch.func.functional_call (row slices, see models.layers.row_projector)
        self.weight is a plain tensor, not the parameter: such calls are never kept."""
        whole = isinstance(self.weight, nn.Parameter)
        if whole and self.kept is not None and self.kept.dtype == dtype:
            return self.kept
        w = dequantize(self.weight, self.scale, dtype)
        if whole and self.keep_expanded:
            self.kept = w
        return w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Embedding table with int8/fp8 rows and one scale per row; outputs in the scale's dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QFormat, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num_embeddings, embedding_dim, fmt
        self.weight = _frozen((num_embeddings, embedding_dim), fmt.dtype, device)
        self.scale = _frozen((num_embeddings,), torch.float32, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., embedding_dim)."""
        return F.embedding(ids, self.weight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)


class ExpandedWeights:
    """Engine: while a `scope` module runs, each QuantLinear under it (and under no nested scope) keeps its expanded
    weight, so a linear called once per token run is dequantized once per scope call; the expansions are dropped
    when the scope returns (or raises). Holds the expanded linears of one scope at a time: in a DiT block (attention
    modules are scopes of their own) both FFN weights in the compute dtype (2x their int8 bytes), from the first FFN
    run to the end of the block."""

    def __init__(self, model: nn.Module, scopes: tuple[type, ...]):
        self.groups: list[tuple[nn.Module, list[QuantLinear]]] = []
        for scope in (m for m in model.modules() if isinstance(m, scopes)):
            linears = [m for m in _modules_outside(scope, scopes) if isinstance(m, QuantLinear)]
            if linears:
                self.groups.append((scope, linears))
        self.handles = []
        for scope, linears in self.groups:
            self.handles.append(scope.register_forward_pre_hook(lambda *_, ls=linears: _keep(ls, True)))
            self.handles.append(scope.register_forward_hook(lambda *_, ls=linears: _keep(ls, False),
                                                            always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for _, linears in self.groups:
            _keep(linears, False)
        self.handles, self.groups = [], []


def keep_expanded_weights(model: nn.Module, scopes: tuple[type, ...]) -> ExpandedWeights:
    """Attach `ExpandedWeights` to `model`; `.remove()` detaches it."""
    return ExpandedWeights(model, scopes)


def _keep(linears: list[QuantLinear], on: bool) -> None:
    for lin in linears:
        lin.keep_expanded, lin.kept = on, None


def _modules_outside(scope: nn.Module, scopes: tuple[type, ...]):
    """Descendants of `scope` that are not inside a nested module of a `scopes` type."""
    for child in scope.children():
        yield child
        if not isinstance(child, scopes):
            yield from _modules_outside(child, scopes)


def _empty_quantized(old: nn.Module, kind: str, fmt: QFormat, name: str) -> nn.Module:
    device = old.weight.device
    if kind == "linear" and isinstance(old, nn.Linear):
        return QuantLinear(old.in_features, old.out_features, old.bias is not None, fmt, device)
    if kind == "embedding" and isinstance(old, nn.Embedding) and old.padding_idx is None and old.max_norm is None:
        return QuantEmbedding(old.num_embeddings, old.embedding_dim, EMBEDDING_FORMAT, device)
    raise CheckpointError(f"quantized tensor {name}.weight ({kind}) is a {type(old).__name__} in the model; "
                          "the quantized folder does not match this model version, re-run quantize.py")


def swap_modules(model: nn.Module, tensors: dict[str, str], fmt: QFormat) -> None:
    """Replace each module named by `tensors` (weight name -> 'linear' | 'embedding') with an empty quantized one
    on the same device (meta included). Modules that are already quantized are left alone."""
    for weight_name, kind in tensors.items():
        name = weight_name.removesuffix(".weight")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(f"quantized tensor {weight_name} names no module of the model; "
                                  "config.json and weights do not match") from None
        if not isinstance(old, QUANT_MODULES):
            setattr(parent, child, _empty_quantized(old, kind, fmt, name))


def stored_dtype_names(model: nn.Module) -> set[str]:
    """State-dict names that must keep their stored dtype at load: quantized codes and linear scales."""
    names = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, QuantLinear):
            names |= {prefix + "weight", prefix + "scale"}
        elif isinstance(module, QuantEmbedding):
            names.add(prefix + "weight")
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: QFormat, tensors: dict[str, str]) -> nn.Module:
    """Quantize a loaded float model in place: the same modules and codes a quantized folder loads into."""
    floats = {name: model.get_submodule(name.removesuffix(".weight")) for name in tensors}
    swap_modules(model, tensors, fmt)
    for name, old in floats.items():
        new = model.get_submodule(name.removesuffix(".weight"))
        new.weight.data, scale = quantize_rows(old.weight, new.fmt)
        # like loading a quantized folder: an embedding's scale takes the model dtype, a linear's stays float32
        new.scale.data = scale.to(old.weight.dtype) if isinstance(new, QuantEmbedding) else scale
        if getattr(old, "bias", None) is not None:
            new.bias.data = old.bias.data
    return model


# ---------------------------------------------------------------- scheme metadata

@dataclass(frozen=True)
class Scheme:
    fmt: QFormat
    tensors: dict[str, str]     # weight tensor name -> 'linear' | 'embedding'

    def metadata(self) -> dict[str, str]:
        scheme = {"version": SCHEME_VERSION, "format": self.fmt.name,
                  "weight_dtype": str(self.fmt.dtype).removeprefix("torch."), "scale_dtype": "float32",
                  "granularity": "per_output_channel", "scale_suffix": SCALE_SUFFIX,
                  "embedding_format": EMBEDDING_FORMAT.name, "tensors": self.tensors}
        # the flat FORMAT_KEY mirrors "format" for readers that only want to show it
        return {SCHEME_KEY: json.dumps(scheme, separators=(",", ":")), FORMAT_KEY: self.fmt.name}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "Scheme":
        try:
            raw = json.loads(metadata[SCHEME_KEY])
            version, fmt, tensors = raw["version"], raw["format"], raw["tensors"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"unreadable {SCHEME_KEY} metadata ({e!r}); re-run quantize.py") from None
        supported = raw.get("granularity") == "per_output_channel" and raw.get("embedding_format") == "int8"
        if version != SCHEME_VERSION or fmt not in FORMATS or not supported:
            raise CheckpointError(f"quantization scheme version {version} / format {fmt!r} / granularity "
                                  f"{raw.get('granularity')!r} is not supported by this version; re-run quantize.py")
        if not isinstance(tensors, dict) or set(tensors.values()) - {"linear", "embedding"}:
            raise CheckpointError(f"{SCHEME_KEY} metadata lists unknown tensor kinds; re-run quantize.py")
        return cls(FORMATS[fmt], tensors)


def prepare_module(module: nn.Module, metadata: dict[str, str]) -> set[str]:
    """Swap the quantized linears/embeddings that `metadata` names (so strict loading succeeds) and return the
    state-dict names that keep their stored dtype. Called by loading.assign.load_weights / match_weights."""
    scheme = Scheme.from_metadata(metadata)
    swap_modules(module, scheme.tensors, scheme.fmt)
    return stored_dtype_names(module)
