"""compile.compile_blocks: the compiled block stack equals eager, one graph serves every block and step (no
recompiles), hooks (block streaming) stay outside the compiled region."""
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_dit
from lowvram_stepvideo.engines.compile import compile_blocks
from lowvram_stepvideo.models.dit import StepVideoModel, set_token_chunk
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dit(layers: int = 3) -> tuple[StepVideoModel, list]:
    model = tiny_dit(layers, 0.05)
    mask = torch.ones(1, 8)
    mask[0, 6:] = 0
    return model, [torch.randn(1, 2, 4, 3, 4), torch.tensor([0.5]), torch.randn(1, 5, 16), torch.randn(1, 3, 8), mask]


def _steps(model, inputs, n: int = 3) -> list[torch.Tensor]:
    """n forwards at different timesteps (the "steps")."""
    with torch.no_grad():
        return [model(inputs[0], torch.tensor([t]), *inputs[2:]) for t in torch.linspace(0.9, 0.2, n).tolist()]


def _compiled_run(model, inputs, backend: str):
    torch._dynamo.reset()
    counters.clear()
    handle = compile_blocks(model.transformer_blocks, backend=backend)
    try:
        return _steps(model, inputs)
    finally:
        handle.detach()


@pytest.mark.slow
def test_one_graph_for_every_block_and_step_with_streaming_hooks_outside():
    """aot_eager traces like inductor but generates no code (~10 s, most of it dynamo's first use)."""
    model, inputs = _dit()
    set_token_chunk(model, 7)
    eager = _steps(model, inputs)
    engine = attach_streaming(model, "cpu", resident=1, prefetch=1, source="ram")   # hooks swap weights per block
    compiled = _compiled_run(model, inputs, backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == 1          # 3 blocks x 3 steps, one trace, no recompile
    assert counters["frames"]["total"] == 1 and not counters["recompiles"]
    assert engine.stats.blocks_fetched > 0
    offload_component(model)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "forward" not in model.transformer_blocks[0].__dict__


@pytest.mark.slow
def test_fast_int8_matmul_in_compiled_blocks_does_not_recompile():
    """The fast kernel's call counter stays outside the trace (a traced count would recompile every call)."""
    from lowvram_stepvideo.engines import fast_matmul
    from lowvram_stepvideo.models import quant
    model, inputs = _dit(2)
    names = [n for n, _ in model.named_parameters()]
    quant.quantize_model(model, quant.FORMATS["int8"], quant.plan_quantization("transformer", names))
    counts = fast_matmul.attach_matmul(model, "int8", cuda=False).value
    eager = _steps(model, inputs)
    compiled = _compiled_run(model, inputs, backend="aot_eager")
    assert counts[0] > 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager():
    """Generated C++ kernels (needs a compiler); ~1 min on a busy 2-core machine."""
    model, inputs = _dit(2)
    eager = _steps(model, inputs)
    compiled = _compiled_run(model, inputs, backend="inductor")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
