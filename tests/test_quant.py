"""quant.py: int8/fp8 weight-only math, quantized modules, the swap at load, the scheme and the size policy."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import RELEASE_MODEL, manifest_shapes
from safetensors.torch import save_file
from torch import nn

from lowvram_stepvideo.models import quant
from lowvram_stepvideo.files.weights import CheckpointError, open_weights
from lowvram_stepvideo.loading.assign import build_on_meta, load_weights
from lowvram_stepvideo.files.configs import DiTConfig
from lowvram_stepvideo.models.dit import StepVideoModel

FORMATS = list(quant.FORMATS)
E4M3_HALF_ULP = 2.0 ** -4      # largest relative rounding error of a normal e4m3 number


def test_int8_codes_are_nearest_steps_of_max_over_127():
    w = torch.randn(64, 300) * torch.logspace(-3, 2, 64)[:, None]
    codes, scale = quant.quantize_rows(w, quant.FORMATS["int8"])
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127, rtol=1e-6, atol=0)
    assert codes.abs().amax(1).eq(127).all()                               # the largest element uses the top code
    err = (quant.dequantize(codes, scale, torch.float32) - w).abs()
    assert (err <= scale[:, None] * (0.5 + 1e-4)).all()                     # round to nearest


def test_fp8_codes_round_to_e4m3_after_scaling_max_to_448():
    w = torch.randn(32, 500)
    codes, scale = quant.quantize_rows(w, quant.FORMATS["fp8"])
    assert codes.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scale, w.abs().amax(1) / 448, rtol=1e-6, atol=0)
    back = quant.dequantize(codes, scale, torch.float32)
    normal = w.abs() >= 2.0 ** -6 * scale[:, None]                          # e4m3 normal range after scaling
    assert ((back - w).abs() <= E4M3_HALF_ULP * w.abs() * 1.0001)[normal].all()
    assert torch.isfinite(back).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_and_tiny_rows_give_finite_scales_and_exact_zeros(fmt):
    w = torch.randn(6, 16)
    w[1] = 0.0
    w[3] = 1e-44          # subnormal: amax / qmax underflows to 0
    w[4, 5] = -1e-38
    codes, scale = quant.quantize_rows(w, quant.FORMATS[fmt])
    assert torch.isfinite(scale).all() and (scale > 0).all()
    back = quant.dequantize(codes, scale, torch.float32)
    assert torch.isfinite(back).all()
    assert back[1].eq(0).all() and back[3].eq(0).all()
    layer = quant.QuantLinear(16, 6, True, quant.FORMATS[fmt])
    layer.weight.data, layer.scale.data, layer.bias.data = codes, scale, torch.zeros(6)
    assert torch.isfinite(layer(torch.randn(3, 16))).all()


def test_non_finite_weights_are_refused():
    w = torch.randn(4, 8)
    w[2, 3] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_rows(w, quant.FORMATS["int8"])


def test_quantize_rows_leaves_float32_input_untouched():
    w = torch.randn(8, 8)
    before = w.clone()
    quant.quantize_rows(w, quant.FORMATS["int8"])
    assert torch.equal(w, before)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_is_a_linear_with_the_dequantized_weight(fmt, dtype):
    float_layer = nn.Linear(40, 24).to(dtype)
    model = nn.Sequential(float_layer)
    quant.quantize_model(model, quant.FORMATS[fmt], {"0.weight": "linear"})
    layer = model[0]
    assert isinstance(layer, quant.QuantLinear) and layer.scale.dtype == torch.float32
    x = torch.randn(5, 7, 40, dtype=dtype)
    plain = F.linear(x, quant.dequantize(layer.weight, layer.scale, dtype), float_layer.bias)
    torch.testing.assert_close(layer(x), plain, atol=0, rtol=0)
    bound = 0.01 if fmt == "int8" else 0.05
    ref = float_layer(x.float() if dtype == torch.float32 else x).float()
    assert ((layer(x).float() - ref).norm() / ref.norm()) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_embedding_returns_dequantized_rows_in_model_dtype(dtype):
    table = nn.Embedding(50, 12).to(dtype)
    model = nn.ModuleDict({"emb": table})
    quant.quantize_model(model, quant.FORMATS["fp8"], {"emb.weight": "embedding"})
    emb = model["emb"]
    assert isinstance(emb, quant.QuantEmbedding)
    assert emb.weight.dtype == torch.int8                  # embeddings are int8 rows in every format
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = emb(ids)
    assert out.dtype == dtype and out.shape == (2, 3, 12)
    torch.testing.assert_close(out, quant.dequantize(emb.weight, emb.scale, dtype)[ids], atol=0, rtol=0)


class Toy(nn.Module):
    """A stand-in network: embedding -> norm -> two linears (one with bias) -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16)
        self.blocks = nn.ModuleList([nn.Linear(16, 32, bias=False), nn.Linear(32, 16)])
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        return self.head(self.blocks[1](F.gelu(self.blocks[0](h))))


TOY_PLAN = {"emb.weight": "embedding", "blocks.0.weight": "linear", "blocks.1.weight": "linear"}


def _toy_folder(tmp_path, fmt, dtype=torch.bfloat16):
    """A hand-made quantized folder (written with safetensors' own writer) plus its float and quantized models."""
    torch.manual_seed(1)
    model = Toy().to(dtype).requires_grad_(False)
    quantized = quant.quantize_model(copy.deepcopy(model), quant.FORMATS[fmt], TOY_PLAN)
    state = {k: v.contiguous() for k, v in quantized.state_dict().items()}
    state["emb.scale"] = state["emb.scale"].float()  # files store every scale as float32
    metadata = {"format": "pt", **quant.Scheme(quant.FORMATS[fmt], TOY_PLAN).metadata()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata=metadata)
    return model, quantized


@pytest.mark.parametrize("fmt", FORMATS)
def test_meta_built_model_loads_quantized_folder_strictly(tmp_path, fmt):
    model, in_memory = _toy_folder(tmp_path, fmt)
    meta = build_on_meta(Toy)
    loaded = load_weights(meta, open_weights(tmp_path, ("model",)), torch.bfloat16)
    assert isinstance(loaded.blocks[0], quant.QuantLinear) and isinstance(loaded.emb, quant.QuantEmbedding)
    assert type(loaded.head) is nn.Linear and type(loaded.norm) is nn.LayerNorm     # exactly the named ones
    assert loaded.blocks[0].weight.dtype == quant.FORMATS[fmt].dtype
    assert loaded.blocks[1].scale.dtype == torch.float32                           # kept as stored
    assert loaded.blocks[1].bias.dtype == torch.bfloat16 and loaded.head.weight.dtype == torch.bfloat16
    assert loaded.emb.weight.dtype == torch.int8 and loaded.emb.scale.dtype == torch.bfloat16
    ids = torch.randint(0, 20, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), in_memory(ids), atol=0, rtol=0)
        ref = model(ids).float()
        assert ((loaded(ids).float() - ref).norm() / ref.norm()) < (0.03 if fmt == "int8" else 0.1)


def test_state_dict_and_to_cover_weight_scale_and_bias():
    model = quant.quantize_model(Toy(), quant.FORMATS["int8"], TOY_PLAN)
    keys = set(model.state_dict())
    assert {"blocks.1.weight", "blocks.1.scale", "blocks.1.bias", "emb.weight", "emb.scale"} <= keys
    moved = model.to("meta")
    assert all(p.is_meta for p in moved.parameters())
    assert moved.blocks[0].weight.dtype == torch.int8 and moved.blocks[0].scale.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_forward_equals_cpu(fmt):
    model = quant.quantize_model(Toy().to(torch.bfloat16), quant.FORMATS[fmt], TOY_PLAN)
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        cpu = model(ids).float()
        gpu = model.to("cuda")(ids.cuda()).float().cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-2, rtol=2e-2)


def test_prepare_module_rejects_mismatching_metadata():
    scheme = quant.Scheme(quant.FORMATS["int8"], {"blocks.5.weight": "linear"})
    with pytest.raises(CheckpointError, match="names no module"):
        quant.prepare_module(build_on_meta(Toy), scheme.metadata())
    scheme = quant.Scheme(quant.FORMATS["int8"], {"norm.weight": "linear"})
    with pytest.raises(CheckpointError, match="is a LayerNorm"):
        quant.prepare_module(build_on_meta(Toy), scheme.metadata())
    bad = scheme.metadata()
    bad[quant.SCHEME_KEY] = bad[quant.SCHEME_KEY].replace('"version":1', '"version":99')
    with pytest.raises(CheckpointError, match="not supported"):
        quant.prepare_module(build_on_meta(Toy), bad)
    with pytest.raises(CheckpointError, match="unreadable"):
        quant.prepare_module(build_on_meta(Toy), {quant.SCHEME_KEY: "{"})


def test_scheme_round_trips_through_metadata():
    scheme = quant.Scheme(quant.FORMATS["fp8"], TOY_PLAN)
    back = quant.Scheme.from_metadata(scheme.metadata())
    assert back == scheme


def _quantized_bytes(component):
    shapes = manifest_shapes(component)
    plan = quant.plan_quantization(component, shapes)
    out = sum(math.prod(s) + 4 * s[0] if k in plan else 2 * math.prod(s) for k, s in shapes.items())
    return out, sum(2 * math.prod(s) for s in shapes.values()), plan, shapes


@pytest.mark.parametrize("component", ["transformer", "step_llm"])
def test_full_size_quantized_component_is_within_one_percent_of_half(component):
    out, bf16, plan, shapes = _quantized_bytes(component)
    assert abs(out / (bf16 / 2) - 1) <= 0.01, f"{component}: {out / 1e9:.3f} GB vs half {bf16 / 2e9:.3f} GB"
    assert all(len(shapes[k]) == 2 for k in plan)


def test_dit_policy_quantizes_every_block_linear_and_keeps_small_projections():
    config = DiTConfig.from_file(RELEASE_MODEL / "transformer" / "config.json")
    model = build_on_meta(lambda: StepVideoModel(config))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = quant.plan_quantization("transformer", model.state_dict())
    assert set(plan) <= linears
    assert {k for k in linears if k.startswith("transformer_blocks.")} <= set(plan)
    kept = linears - set(plan)
    assert kept == {"proj_out.weight", "clip_projection.weight", "adaln_single.emb.timestep_embedder.linear_1.weight"}
    quant.swap_modules(model, plan, quant.FORMATS["fp8"])  # the swap works on the meta-built full-size model
    assert sum(isinstance(m, quant.QuantLinear) for m in model.modules()) == len(plan)
