"""The attach registry (engines/attach.py): every mechanism on the tiny DiT, in every valid combination, runs a
forward and comes off leaving the module exactly as it was (state dict, every submodule's attributes, the forward
bit for bit); the rules between mechanisms are enforced.

Detaching: a handle that is already off does nothing (chosen so that cleanup paths may run twice); detaching out of
order (a handle attached later on the same module is still on) is refused and changes nothing.

Compile is attached here with a stand-in for torch.compile (`_plain_compile`: the class's forward itself), so the
sweep tests the mechanism (each block's `forward` routed and restored) without dynamo's tracing time;
`test_compiled_levers_come_off_exactly` runs the real torch.compile once.
"""
import functools
import itertools

import pytest
import torch

from conftest import tiny_dit
from lowvram_stepvideo.engines import attention, compile as regional_compile, parallel
from lowvram_stepvideo.engines.attach import AttachError, Attachments, attached, attaching, detach_all
from lowvram_stepvideo.engines.fast_matmul import attach_matmul
from lowvram_stepvideo.engines.levers import attach_expanded_weights
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component, to_device
from lowvram_stepvideo.engines.step_cache import FirstBlockCache
from lowvram_stepvideo.models import quant

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLACEMENTS = (None, "placement", "streaming")
SPLITS = {None: None, "sequence": parallel.Layout(2, 0, cfg=1, sequence=2), "cfg": parallel.Layout(2, 0, cfg=2, sequence=1),
          "cfg+sequence": parallel.Layout(4, 0, cfg=2, sequence=2)}


def _quantized_dit():
    """The tiny DiT with int8 block linears (so fast matmuls and kept expansions have something to change)."""
    dit = tiny_dit(2, 0.05)
    names = [n for n, _ in dit.named_parameters()]
    return quant.quantize_model(dit, quant.FORMATS["int8"], quant.plan_quantization("transformer", names))


@pytest.fixture
def dit():
    return _quantized_dit()


@pytest.fixture(scope="module")
def inputs():
    """A guided pair as one batch of 2 (what CFG parallel takes), 32 tokens, a masked caption."""
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 8)
    mask[1, 6:] = 0
    return (torch.randn(2, 2, 4, 4, 4, generator=g), torch.tensor([0.7, 0.7]), torch.randn(2, 5, 16, generator=g),
            torch.randn(2, 3, 8, generator=g), mask)


@pytest.fixture
def plain_compile(monkeypatch):
    monkeypatch.setattr(regional_compile, "compiled_forward", _plain_compile)


def _plain_compile(cls, backend):
    def forward(block, *args):
        return cls.forward(block, *args)
    return forward


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------- what "exactly as it was" means

def _copy(value):
    """A shallow copy of an attribute value: containers copied (their items kept as objects), the rest as is."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (set, list)):
        return list(value)
    return value


def module_state(model) -> dict:
    """Every submodule's attributes (containers copied one level deep) and every tensor: its object, storage and
    value."""
    attrs = {name: {k: _copy(v) for k, v in vars(m).items()} for name, m in model.named_modules()}
    tensors = {name: (t, t.data.data_ptr(), t.data.clone()) for name, t in
               list(model.named_parameters()) + list(model.named_buffers())}
    return {"attrs": attrs, "tensors": tensors}


def assert_same_module(model, before: dict, rebuilt: tuple[str, ...] = ()) -> None:
    """`model` as `before` recorded it: the same attribute objects on every submodule, the same parameter and
    buffer objects with bit-identical values on their own storage. Tensors under a `rebuilt` prefix may hold new
    storage (block streaming rebuilds an in-memory model's streamed blocks instead of keeping a copy of them)."""
    now = module_state(model)
    assert now["attrs"].keys() == before["attrs"].keys()
    for name, attrs in before["attrs"].items():
        got = now["attrs"][name]
        assert got.keys() == attrs.keys(), f"{name or 'model'}: attributes {sorted(got.keys() ^ attrs.keys())}"
        for key, value in attrs.items():
            mine = got[key]
            if isinstance(value, dict):
                assert mine.keys() == value.keys() and all(mine[k] is value[k] for k in value), f"{name}.{key}"
            elif isinstance(value, list):
                assert len(mine) == len(value) and all(a is b for a, b in zip(mine, value)), f"{name}.{key}"
            else:
                assert mine is value, f"{name}.{key}: {mine!r} is not {value!r}"
    assert now["tensors"].keys() == before["tensors"].keys()
    for name, (t, ptr, value) in before["tensors"].items():
        t_now, ptr_now, value_now = now["tensors"][name]
        assert t_now is t and value_now.dtype == value.dtype and torch.equal(value_now, value), name
        assert ptr_now == ptr or name.startswith(rebuilt), f"{name}: not its own storage"


# ---------------------------------------------------------------- every combination

def _combinations():
    for place, attend, expand, matmul, cache, comp, split in itertools.product(
            PLACEMENTS, (False, True), (False, True), (False, True), (False, True), (False, True), SPLITS):
        if not (expand and comp):          # attach.EXCLUSIVE
            yield place, attend, expand, matmul, cache, comp, split


def attach_in_run_order(dit, place, attend, expand, matmul, cache, comp, split) -> Attachments:
    """The mechanisms asked for, in the order a run attaches them (runtime placement, then the levers)."""
    done = Attachments()
    with done:
        if place == "placement":
            to_device(dit, "cpu")
        elif place == "streaming":
            attach_streaming(dit, "cpu", resident=0, prefetch=1, source="ram", pin_budget_bytes=2**30)
        if attend:   # a kernel object of its own that computes what the default one does
            done.add(attention.attach_attention(dit, functools.partial(attention.attention, backend="sdpa")))
        if expand:
            done.add(attach_expanded_weights(dit))
        if matmul:
            done.add(attach_matmul(dit, "int8", cuda=False))
        if cache:
            done.add(FirstBlockCache(0.5).attach(dit).handle)
        if comp:
            done.add(regional_compile.compile_blocks(dit.transformer_blocks))
        if split:
            done.add(parallel.attach(dit, parallel.Parallel.planned(SPLITS[split])))
    return done


def test_every_valid_combination_comes_off_exactly(dit, inputs, plain_compile):
    """288 combinations: placement (none, whole, streamed) x attention x kept expansions x fast matmul x step cache
    x compile (never with kept expansions) x parallel split (none, sequence, CFG, both; a planned group: nothing
    is sent). Each runs a forward; the exact ones (no fast matmul, no split) give the plain output bit for bit."""
    plain, before = _run(dit, inputs), module_state(dit)
    combos = list(_combinations())
    assert len(combos) == 3 * 2 * 3 * 2 * 2 * 4
    for combo in combos:
        place, attend, expand, matmul, cache, comp, split = combo
        levers = attach_in_run_order(dit, *combo)
        names = attached(dit)
        assert len(names) == len(set(names)) == sum(map(bool, combo[:6])) + len(split.split("+") if split else ())
        out = _run(dit, inputs)
        assert out.shape == plain.shape
        if not (matmul or split):
            assert torch.equal(out, plain), combo
        levers.detach()
        offload_component(dit)
        assert attached(dit) == []
        assert_same_module(dit, before, rebuilt=("transformer_blocks.",) if place == "streaming" else ())
        assert torch.equal(_run(dit, inputs), plain), combo


@pytest.mark.slow
def test_compiled_levers_come_off_exactly(inputs):
    """The real torch.compile (dynamo tracing, "eager" backend) under streaming, attention, fast matmul and the
    step cache."""
    dit = _quantized_dit()
    plain, before = _run(dit, inputs), module_state(dit)
    torch._dynamo.reset()
    levers = Attachments()
    with levers:
        attach_streaming(dit, "cpu", resident=1, prefetch=1, source="ram")
        levers.add(attention.attach_attention(dit, functools.partial(attention.attention, backend="sdpa")))
        levers.add(attach_matmul(dit, "int8", cuda=False))
        levers.add(FirstBlockCache(0.5).attach(dit).handle)
        levers.add(regional_compile.compile_blocks(dit.transformer_blocks, backend="eager"))
    assert _run(dit, inputs).shape == plain.shape
    levers.detach()
    offload_component(dit)
    assert_same_module(dit, before, rebuilt=("transformer_blocks.",))
    assert torch.equal(_run(dit, inputs), plain)


# ---------------------------------------------------------------- the rules

def test_sequence_parallel_goes_on_after_the_attention_kernel(dit, inputs):
    before = module_state(dit)
    split = parallel.attach(dit, parallel.Parallel.planned(SPLITS["sequence"]))
    wrapped = module_state(dit)
    with pytest.raises(AttachError, match="attention must be attached before sequence_parallel"):
        attention.use_attention_backend(dit, "sdpa")
    assert_same_module(dit, wrapped)                   # the refused kernel changed nothing
    split.detach()
    assert_same_module(dit, before)


def test_exclusive_and_repeated_mechanisms_are_refused(dit, plain_compile):
    expanded = attach_expanded_weights(dit)
    with pytest.raises(AttachError, match="compile does not go with expanded_weights"):
        regional_compile.compile_blocks(dit.transformer_blocks)      # on the block list, inside the DiT
    with pytest.raises(AttachError, match="expanded_weights is already attached"):
        attach_expanded_weights(dit)
    expanded.detach()
    compiled = regional_compile.compile_blocks(dit.transformer_blocks)
    with pytest.raises(AttachError, match="expanded_weights does not go with compile"):
        attach_expanded_weights(dit)                                   # on the DiT, around the block list
    compiled.detach()
    to_device(dit, "cpu")
    with pytest.raises(AttachError, match="streaming does not go with placement"):
        attach_streaming(dit, "cpu")
    offload_component(dit)
    assert attached(dit) == []


def test_detaching_out_of_order_is_refused_and_twice_does_nothing(dit):
    before = module_state(dit)
    kernel = attention.use_attention_backend(dit, "sdpa")
    split = parallel.attach(dit, parallel.Parallel.planned(SPLITS["sequence"]))
    both = module_state(dit)
    with pytest.raises(AttachError, match="attention cannot come off before sequence_parallel"):
        kernel.detach()
    assert_same_module(dit, both)
    split.detach()
    split.detach()                                     # already off: nothing happens
    kernel.detach()
    kernel.detach()
    assert_same_module(dit, before)


def test_detach_all_and_a_discarded_model_take_everything_off_last_first():
    dit = _quantized_dit()
    to_device(dit, "cpu")
    attention.use_attention_backend(dit, "sdpa")
    parallel.attach(dit, parallel.Parallel.planned(SPLITS["cfg+sequence"]))
    assert attached(dit) == ["placement", "attention", "sequence_parallel", "cfg_parallel"]
    offload_component(dit, discard=True)
    assert attached(dit) == [] and all(p.numel() == 0 for p in dit.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in dit.modules())
    assert all(m.attend is attention.sdpa for m in dit.modules() if hasattr(m, "attend"))
    dit = _quantized_dit()
    before = module_state(dit)
    FirstBlockCache(0.5).attach(dit)
    attach_matmul(dit, "int8", cuda=False)
    detach_all(dit)
    assert_same_module(dit, before)


def test_a_failed_attach_undoes_what_it_did(dit):
    before = module_state(dit)
    first = next(m for m in dit.modules() if hasattr(m, "attend"))
    with pytest.raises(RuntimeError, match="half way"):
        with attaching(dit, "attention") as handle:
            handle.set(first, "attend", None)
            raise RuntimeError("half way")
    assert_same_module(dit, before)
    with pytest.raises(AttachError, match="unknown mechanism"):
        with attaching(dit, "telepathy"):
            pass
    with pytest.raises(AttachError, match="parameter, buffer or submodule"):
        with attaching(dit, "attention") as handle:
            handle.set(dit, "scale_shift_table", None)
    assert_same_module(dit, before)
