"""The DiT's speed levers as compositions of attach handles (engines/levers.py): a real run's and a plan's levers,
parallel splits included, come off leaving the DiT exactly as it was, `attend` included; and the run and the plan
choose the attention kernel and the matmul with the same functions, for a card passed in."""
import pytest
import torch

from test_attach import _plain_compile, _quantized_dit, _run, assert_same_module, module_state
from lowvram_stepvideo.engines import attention, compile as regional_compile, fast_matmul, parallel
from lowvram_stepvideo.engines.attach import attached
from lowvram_stepvideo.engines.target import PROFILE_CUDA_TARGET as PROFILE_CUDA_CARD, Target as Card, current_target as current_card, planned_target as target_card
from lowvram_stepvideo.engines.levers import DiTLevers, SpeedOptions
from lowvram_stepvideo.engines.streaming import GiB, packed_budget_bytes
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.models import quant
from lowvram_stepvideo.pipeline.parallel_machine import ParallelRuntime
from lowvram_stepvideo.profiles import load_profile, with_overrides

from conftest import tiny_dit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = load_profile("cpu")
CUDA_FAST = with_overrides(load_profile("12gb"), matmul="fast")
RTX_3090 = Card((8, 6), "NVIDIA GeForce RTX 3090")


def _fp8_dit():
    dit = tiny_dit(2, 0.05)
    names = [n for n, _ in dit.named_parameters()]
    return quant.quantize_model(dit, quant.FORMATS["fp8"], quant.plan_quantization("transformer", names))


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 2, 4, 4, 4, generator=g), torch.tensor([0.3, 0.3]), torch.randn(2, 5, 16, generator=g),
            torch.randn(2, 3, 8, generator=g), None)


@pytest.mark.parametrize("planning, options, split", [
    (False, SpeedOptions(cache=0.5), None),
    (False, SpeedOptions(compile=True), "cfg"),
    (True, SpeedOptions(cache=0.5), "cfg+sequence"),
], ids=["run-cache", "run-compile-cfg", "plan-cache-cfg-x-sequence"])
def test_levers_come_off_exactly(monkeypatch, inputs, planning, options, split):
    monkeypatch.setattr(regional_compile, "compiled_forward", _plain_compile)
    dit = _quantized_dit()
    plain, before = _run(dit, inputs), module_state(dit)
    layouts = {"cfg": parallel.Layout(2, 0, 2, 1), "cfg+sequence": parallel.Layout(4, 0, 2, 2)}
    par = parallel.Parallel.planned(layouts[split]) if split else None
    card = target_card(CPU) if planning else current_card("cpu")
    levers = DiTLevers(dit, CPU, options, torch.device("cpu"), card, planning=planning, par=par).attach()
    if planning:     # the chosen kernel's stand-in, wrapped by the sequence split where there is one
        kernels = [m.attend for m in dit.modules() if hasattr(m, "attend")]
        assert all(getattr(k, "inner", k) is attention.output_only for k in kernels)
    expected = ["attention"] + (["expanded_weights"] if not options.compile else []) + ["matmul"] + \
        (["step_cache"] if options.cache else []) + (["compile"] if options.compile else []) + \
        {None: [], "cfg": ["cfg_parallel"], "cfg+sequence": ["sequence_parallel", "cfg_parallel"]}[split]
    assert attached(dit) == expected
    _run(dit, inputs)
    levers.detach()
    assert attached(dit) == []
    assert_same_module(dit, before)
    assert torch.equal(_run(dit, inputs), plain)


def test_a_failing_lever_takes_off_the_ones_before_it(monkeypatch):
    dit = _quantized_dit()
    before = module_state(dit)

    def broken(*args):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(regional_compile, "compiled_forward", broken)
    with pytest.raises(RuntimeError, match="no compiler"):
        DiTLevers(dit, CPU, SpeedOptions(cache=0.5, compile=True), torch.device("cpu"), current_card("cpu")).attach()
    assert attached(dit) == []
    assert_same_module(dit, before)


def test_the_plan_chooses_the_matmul_with_the_runs_function_for_its_card():
    """A CUDA profile plans for PROFILE_CUDA_CARD (what the planner assumed before cards were passed in: every
    kernel); fed a card without fp8 tensor cores, the plan counts weight-only as a run on that card would."""
    assert target_card(CUDA_FAST) == PROFILE_CUDA_CARD and target_card(CPU) == Card(None, "cpu")
    assert fast_matmul.choose_matmul(CUDA_FAST, "fp8", PROFILE_CUDA_CARD)[0] == "fp8"
    assert fast_matmul.choose_matmul(CUDA_FAST, "int8", PROFILE_CUDA_CARD)[0] == "int8"
    assert fast_matmul.choose_matmul(CUDA_FAST, "fp8", RTX_3090)[0] is None
    assert fast_matmul.choose_matmul(CUDA_FAST, "int8", RTX_3090)[0] == "int8"
    assert fast_matmul.choose_matmul(with_overrides(CPU, matmul="fast"), "int8", target_card(CPU))[0] is None
    for card, expected in ((PROFILE_CUDA_CARD, "fp8 x fp8"), (RTX_3090, "weight-only")):
        dit = _fp8_dit()
        levers = DiTLevers(dit, CUDA_FAST, SpeedOptions(), torch.device("cpu"), card, planning=True).attach()
        assert levers.info["matmul"] == expected
        fast = [m.matmul for m in dit.modules() if isinstance(m, quant.QuantLinear)]
        assert all(f is not None for f in fast) if expected != "weight-only" else all(f is None for f in fast)
        levers.detach()


def test_the_plan_attaches_the_kernel_the_run_would_choose(monkeypatch):
    monkeypatch.setattr(attention, "_kernel", lambda n: (lambda *a, **kw: None) if n in ("sage", "flash2") else None)
    auto = load_profile("12gb")
    for card, expected in ((PROFILE_CUDA_CARD, "sage"), (RTX_3090, "sage"), (Card((8, 0), "NVIDIA A100"), "flash2")):
        dit = _quantized_dit()
        levers = DiTLevers(dit, auto, SpeedOptions(), torch.device("cpu"), card, planning=True).attach()
        kernel, _ = attention.choose_attention(auto, card)
        assert levers.info["attention"] == kernel == expected
        assert {m.attend for m in dit.modules() if hasattr(m, "attend")} == {attention.planned_kernel(kernel)}
        levers.detach()
        assert {m.attend for m in dit.modules() if hasattr(m, "attend")} == {attention.sdpa}


def test_packed_budget_in_bytes():
    assert packed_budget_bytes(CPU) == int(CPU.memory.packed_gb * GiB) > 0
    assert packed_budget_bytes(with_overrides(CPU, memory_packed_gb=1.5)) == int(1.5 * GiB)


def test_a_parallel_rank_attaches_its_splits_with_the_levers_and_takes_them_off(demo_dir):
    """ParallelRuntime (a planned group: nothing is sent): the splits go on after the attention kernel, inside
    the levers, and come off with them."""
    folder = open_model_folder(demo_dir)
    runtime = ParallelRuntime(folder, CPU, parallel.Parallel.planned(parallel.Layout(4, 0, 2, 2)), log=lambda m: None)
    dit = runtime.load("transformer", torch.float32)
    before = module_state(dit)
    levers = runtime.attach_levers(dit, SpeedOptions())
    assert attached(dit) == ["attention", "expanded_weights", "matmul", "sequence_parallel", "cfg_parallel"]
    report = runtime.detach_levers(levers)
    assert report["attention"] == "sdpa" and attached(dit) == []
    assert_same_module(dit, before)
