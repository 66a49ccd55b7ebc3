"""quant.dequantize is float32 math rounded once; ExpandedWeights expands each linear once per block forward."""
from collections import Counter

import pytest
import torch

from lowvram_stepvideo.models import quant
from lowvram_stepvideo.files.configs import DiTConfig
from lowvram_stepvideo.models.dit import TOKEN_RUN_SCOPES, StepVideoModel, set_attention_head_chunk, set_token_chunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers around each value of the float64 tensor `ref`."""
    mantissa = {torch.bfloat16: 7, torch.float32: 23}[dtype]
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))
    return torch.pow(2.0, exponent - mantissa)


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_within_half_an_ulp_of_the_float64_product(fmt, dtype, monkeypatch):
    monkeypatch.setattr(quant, "DEQUANT_PIECE", 1000)        # several pieces of rows
    w = torch.randn(300, 64, dtype=torch.float64) * torch.logspace(-3, 1, 300, dtype=torch.float64)[:, None]
    codes, scale = quant.quantize_rows(w.float(), quant.FORMATS[fmt])
    ref = codes.double() * scale.double()[:, None]
    out = quant.dequantize(codes, scale, dtype)
    assert out.dtype == dtype and out.shape == codes.shape
    bound = 0.5 * _ulp(ref, dtype) * (1 + 2.0 ** -20) + 1e-300
    assert ((out.double() - ref).abs() <= bound).all()
    if dtype == torch.bfloat16:   # the bound is tight enough to see a scale rounded to bf16 first (the old path)
        old = codes.to(dtype) * scale.to(dtype)[:, None]
        assert ((old.double() - ref).abs() > bound).any()


def _quantized_dit(fmt: str = "int8") -> tuple[StepVideoModel, list[torch.Tensor]]:
    config = DiTConfig(num_layers=2, num_heads=2, in_channels=4, out_channels=4, caption_channels=(16, 8))
    model = StepVideoModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    names = [n for n, _ in model.named_parameters()]
    quant.quantize_model(model, quant.FORMATS[fmt], quant.plan_quantization("transformer", names))
    mask = torch.ones(1, 8)
    mask[0, 6:] = 0
    inputs = [torch.randn(1, 2, 4, 4, 5), torch.tensor([0.4]), torch.randn(1, 5, 16), torch.randn(1, 3, 8), mask]
    return model, inputs


def _count_expansions(model, inputs, monkeypatch) -> tuple[Counter, torch.Tensor]:
    """Rows of weight expanded per block-0 linear during one forward, and the output."""
    rows, owner = Counter(), {}
    for name, m in model.transformer_blocks[0].named_modules():
        if isinstance(m, quant.QuantLinear):
            owner[m.weight.untyped_storage().data_ptr()] = name
    real = quant.dequantize

    def counting(codes, scale, dtype):
        name = owner.get(codes.untyped_storage().data_ptr())
        if name is not None:
            rows[name] += codes.shape[0]
        return real(codes, scale, dtype)
    monkeypatch.setattr(quant, "dequantize", counting)
    with torch.no_grad():
        out = model(*inputs)
    monkeypatch.setattr(quant, "dequantize", real)
    return rows, out


def test_each_linear_is_expanded_once_per_block_forward(monkeypatch):
    model, inputs = _quantized_dit()
    set_token_chunk(model, 7)              # 40 tokens: 6 runs through the FFN and the output projections
    set_attention_head_chunk(model, 1)
    full_rows = {name: m.out_features for name, m in model.transformer_blocks[0].named_modules()
                 if isinstance(m, quant.QuantLinear)}
    per_run, plain = _count_expansions(model, inputs, monkeypatch)
    assert per_run["ff.net.0.proj"] == 6 * full_rows["ff.net.0.proj"]      # without the engine: once per run
    engine = quant.keep_expanded_weights(model, TOKEN_RUN_SCOPES)
    once, kept = _count_expansions(model, inputs, monkeypatch)
    assert dict(once) == full_rows                                        # head groups: their rows once each
    assert torch.equal(kept, plain)
    assert all(m.kept is None and not m.keep_expanded for m in model.modules() if isinstance(m, quant.QuantLinear))
    engine.remove()
    again, _ = _count_expansions(model, inputs, monkeypatch)
    assert again == per_run


def test_expansions_are_dropped_when_the_scope_raises():
    model, inputs = _quantized_dit()
    set_token_chunk(model, 7)
    engine = quant.keep_expanded_weights(model, TOKEN_RUN_SCOPES)
    ff = model.transformer_blocks[0].ff
    boom = ff.net[2].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(*inputs)
    boom.remove()
    assert ff.net[0].proj.kept is None and not ff.net[0].proj.keep_expanded
    engine.remove()
