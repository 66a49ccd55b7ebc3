"""fast_matmul: int8 x int8 (_int_mm) and fp8 x fp8 (_scaled_mm) linears on the CPU against float64, the choice
by compute capability, the fallback for calls the kernels do not take, and the error on the fixture DiT."""
import pytest
import torch
import torch.nn.functional as F
from conftest import read_io

from lowvram_stepvideo.engines import fast_matmul as fm
from lowvram_stepvideo.models import quant
from lowvram_stepvideo.loading.loaders import load_dit
from lowvram_stepvideo.profiles import load_profile, with_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# relative Frobenius error of the activation rounding on Gaussian data (int8: ~0.6%, e4m3: ~2%), with headroom
ACTIVATION_ERROR = {"int8": 0.012, "fp8": 0.04}


def _layer(fmt: str, n=256, k=512):
    w = torch.randn(n, k) * 0.05
    codes, scale = quant.quantize_rows(w, quant.FORMATS[fmt])
    return codes, scale, torch.randn(n)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64_within_activation_rounding(fmt, dtype):
    codes, scale, bias = _layer(fmt)
    x = torch.randn(3, 40, 512).to(dtype)
    w64 = codes.double() * scale.double()[:, None]
    ref = F.linear(x.double(), w64, bias.double())
    y = fm.KERNELS[fmt](x, codes, scale, bias.to(dtype))
    assert y.dtype == dtype and y.shape == (3, 40, 256)
    assert 1e-4 < _rel(y, ref) < ACTIVATION_ERROR[fmt]    # rounded activations: not the weight-only function
    if fmt == "int8" and dtype == torch.float32:
        # activations already on the int8 grid (row max = 127 steps of 2^-7): only float32 rounding remains
        ints = torch.randint(-127, 128, (120, 512)).float()
        ints[:, 0] = 127
        on_grid = ints * 2.0 ** -7
        exact = F.linear(on_grid.double(), w64, bias.double())
        assert _rel(fm.int8_linear(on_grid, codes, scale, bias), exact) < 1e-6


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_row_pieces_give_the_same_rows(fmt, monkeypatch):
    codes, scale, bias = _layer(fmt, 64, 128)
    x = torch.randn(2, 50, 128)
    whole = fm.KERNELS[fmt](x, codes, scale, bias)
    monkeypatch.setattr(fm, "FAST_ROWS", 24)                # 100 rows: 24, 24, 24, 28 (a 4-row tail is merged)
    torch.testing.assert_close(fm.KERNELS[fmt](x, codes, scale, bias), whole, rtol=1e-6, atol=1e-6)


def test_choice_by_compute_capability():
    assert fm.choose("weight-only", "int8", "cuda", (9, 0))[0] is None
    assert fm.choose("fast", "int8", "cuda", (8, 0))[0] == "int8"
    assert fm.choose("fast", "int8", "cuda", (7, 5))[0] is None
    assert fm.choose("fast", "fp8", "cuda", (8, 9))[0] == "fp8"
    assert fm.choose("fast", "fp8", "cuda", (8, 6))[0] is None
    assert fm.choose("fast", "fp8", "cuda", (9, 0))[0] == "fp8"
    for args in (("fast", "int8", "cpu", None), ("fast", "bf16", "cuda", (9, 0)), ("fast", "fp8", "cuda", (8, 6))):
        kernel, why = fm.choose(*args)
        assert kernel is None and "weight-only" in why and "\n" not in why
    with pytest.raises(ValueError, match="unknown matmul mode 'int4'"):
        fm.choose("int4", "int8", "cuda", (9, 0))


def test_profile_key_and_override_are_validated():
    profile = load_profile("cpu")
    assert profile.matmul == "weight-only"
    assert with_overrides(profile, matmul="fast").matmul == "fast"
    with pytest.raises(ValueError, match="override matmul = 'int4'"):
        with_overrides(profile, matmul="int4")


def test_probe_reports_a_kernel_that_fails(monkeypatch):
    assert fm.probe("int8", "cpu") is None and fm.probe("fp8", "cpu", torch.float32) is None

    def broken(*args):
        raise RuntimeError("no kernel image\nsecond line")
    monkeypatch.setitem(fm.KERNELS, "fp8", broken)
    assert fm.probe("fp8", "cpu") == "no kernel image"


def test_small_or_odd_calls_run_weight_only():
    codes, scale, bias = _layer("int8", 48, 64)
    layer = quant.QuantLinear(64, 48, True, quant.FORMATS["int8"])
    layer.weight.data, layer.scale.data, layer.bias.data = codes, scale, bias
    count = [0, 0]
    layer.matmul = fm.fast_kernel("int8", cuda=True, count=count)
    x = torch.randn(16, 64)                                 # 16 rows: _int_mm on CUDA needs more
    torch.testing.assert_close(layer(x), F.linear(x, quant.dequantize(codes, scale, torch.float32), bias))
    assert count == [0, 1]
    layer(torch.randn(17, 64))
    assert count == [1, 1]
    odd = fm.fast_kernel("int8", cuda=True)
    assert odd(torch.randn(32, 64), *_layer("int8", 40, 64)) is None    # widths not multiples of 16
    bf16 = fm.fast_kernel("fp8", cuda=True)
    assert bf16(torch.randn(32, 64), *_layer("fp8", 32, 64)) is None    # CUDA row-wise fp8 writes bf16 only


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fixture_dit_error_of_fast_against_weight_only(fixture_dir, fmt):
    """DiT out.x of the fixture, quantized: fast vs weight-only (numbers in BENCHMARKS.md)."""
    t, _ = read_io(fixture_dir / "dit_io.safetensors")
    model = load_dit(fixture_dir / "model_dir" / "transformer", dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    quant.quantize_model(model, quant.FORMATS[fmt], quant.plan_quantization("transformer", names))
    inputs = [t["in.hidden_states"], t["in.timestep"], t["in.encoder_hidden_states"], t["in.encoder_hidden_states_2"],
              t["in.encoder_attention_mask"]]
    with torch.no_grad():
        weight_only = model(*inputs)
        count = fm.attach_matmul(model, fmt, cuda=False).value
        fast = model(*inputs)
    assert count[0] > 0
    err = float((fast - weight_only).norm() / weight_only.norm())
    assert 0 < err < {"int8": 0.02, "fp8": 0.06}[fmt]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cuda_kernel_matches_the_cpu_kernel(fmt):
    if fm.choose("fast", fmt, "cuda", fm.device_capability("cuda"))[0] is None:
        pytest.skip(f"this card has no {fmt} tensor-core matmul")
    codes, scale, bias = _layer(fmt, 256, 512)
    x = torch.randn(2, 100, 512).bfloat16()
    cpu = fm.KERNELS[fmt](x.float(), codes, scale, bias).double()
    gpu = fm.KERNELS[fmt](x.cuda(), codes.cuda(), scale.cuda(), bias.bfloat16().cuda()).double().cpu()
    assert _rel(gpu, cpu) < 1e-2
