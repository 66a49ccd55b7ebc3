"""StepVideoModel against the reference fixtures (float32), the bf16 quirks Q1-Q5, the full-size state dict."""
import math

import pytest
import torch
from conftest import RELEASE_MODEL, manifest_shapes, read_io

from lowvram_stepvideo.loading.assign import build_on_meta
from lowvram_stepvideo.files.configs import DiTConfig
from lowvram_stepvideo.loading.loaders import load_dit
from lowvram_stepvideo.models.dit import (
    FeedForward,
    StepVideoModel,
    StepVideoTransformerBlock,
    cross_attention_mask,
    rope_tables,
    set_attention_head_chunk,
    set_token_chunk)
from lowvram_stepvideo.models.layers import RMSNorm, row_projector

ATOL = 1e-4
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")
# fixture intermediate -> module whose forward output it is
HOOKED = {"pos_embed": "pos_embed", "timestep_sinusoid": "adaln_single.emb.time_proj",
          "caption_projection": "caption_projection", "clip_projection": "clip_projection",
          "block0.attn1": "transformer_blocks.0.attn1", "block0.attn2": "transformer_blocks.0.attn2",
          "proj_out": "proj_out"}


def _load(fixture_dir, dtype=torch.float32):
    tensors, _ = read_io(fixture_dir / "dit_io.safetensors")
    model = load_dit(fixture_dir / "model_dir" / "transformer", dtype=dtype)
    return model, tensors


def _inputs(tensors, dtype=torch.float32):
    """Fixture inputs; with bf16 everything is cast like the pipeline does (mask and timestep included)."""
    ins = [tensors[f"in.{k}"] for k in INPUTS]
    return ins if dtype == torch.float32 else [x.to(dtype) for x in ins]


def _run_capturing(model, inputs, names):
    captured, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out)))
    with torch.inference_mode():
        out = model(*inputs)
    for h in handles:
        h.remove()
    return out, captured


def _close(got, ref, atol=ATOL):
    assert got.shape == ref.shape or got.numel() == ref.numel(), (got.shape, ref.shape)
    err = (got.reshape(ref.shape).float() - ref.float()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


def test_output_and_intermediates_match_reference(fixture_dir):
    model, t = _load(fixture_dir)
    blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    out, cap = _run_capturing(model, _inputs(t), list(HOOKED.values()) + blocks + ["adaln_single"])
    _close(out, t["out.x"])
    for key, module in HOOKED.items():
        _close(cap[module], t[f"inter.{key}"])
    for i, name in enumerate(blocks):
        if f"inter.block{i}" in t:
            _close(cap[name], t[f"inter.block{i}"])
    _close(cap["adaln_single"][0], t["inter.adaln_single.0"])
    _close(cap["adaln_single"][1], t["inter.adaln_single.1"])


def test_cross_attention_mask_matches_reference(fixture_dir):
    _, t = _load(fixture_dir)
    ref = t["derived.cross_attn_mask"].bool()                      # (B, S, max_kv)
    _, key_mask = cross_attention_mask(t["in.encoder_attention_mask"])  # (B, Skv): keys past max_kv masked
    max_kv = ref.shape[-1]
    assert torch.equal(key_mask[:, None, :max_kv].expand_as(ref), ref) and not key_mask[:, max_kv:].any()


def test_ffn_chunking_same_result(fixture_dir):
    model, t = _load(fixture_dir)
    with torch.inference_mode():
        plain = model(*_inputs(t))
        tokens = plain.shape[0] * plain.shape[1] * plain.shape[3] * plain.shape[4]
        for chunk in (1, 7, tokens // 2, tokens - 1, tokens, 10 * tokens):
            set_token_chunk(model, chunk)
            chunked = model(*_inputs(t))
            # GEMMs over fewer rows may sum in another order: equal up to float32 rounding, not always bit-exact
            assert (chunked - plain).abs().max().item() <= 1e-5, chunk
    set_token_chunk(model, None)
    with pytest.raises(ValueError, match="positive"):
        set_token_chunk(model, 0)


def test_ffn_chunk_bounds_hidden_rows():
    ff = FeedForward(8)
    for p in ff.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 11, 8)  # 22 tokens
    ff.chunk_tokens = 5
    rows = []
    handle = ff.net[0].register_forward_hook(lambda m, a, out: rows.append(out.shape[:-1].numel()))
    with torch.no_grad():
        chunked = ff(x)
    handle.remove()
    assert rows == [5, 5, 5, 5, 2]
    with torch.no_grad():
        ff.chunk_tokens = None
        torch.testing.assert_close(chunked, ff(x), rtol=0, atol=1e-5)


def test_blocks_take_tensors_only_and_hooks_run(fixture_dir):
    """The streaming engine attaches forward-pre-hooks to the blocks: their positional args must be tensors."""
    model, t = _load(fixture_dir)
    seen = []

    def pre_hook(module, args):
        assert isinstance(module, StepVideoTransformerBlock)
        assert all(isinstance(a, torch.Tensor) for a in args), [type(a) for a in args]
        seen.append(len(args))

    handles = [b.register_forward_pre_hook(pre_hook) for b in model.transformer_blocks]
    with torch.inference_mode():
        model(*_inputs(t))
    for h in handles:
        h.remove()
    assert seen == [6] * len(model.transformer_blocks)


def test_attention_backend_switch(fixture_dir):
    from lowvram_stepvideo.engines import attention
    model, t = _load(fixture_dir)
    with torch.inference_mode():
        plain = model(*_inputs(t))
        assert attention.use_attention_backend(model, "sdpa").value == "sdpa"
        _close(model(*_inputs(t)), plain, atol=1e-6)
    attend = {m.attend for m in model.modules() if hasattr(m, "attend")}
    assert attend == {attention.sdpa} and len([m for m in model.modules() if hasattr(m, "attend")]) == \
        2 * len(model.transformer_blocks)


# ------------------------------------------------------------------ memory knobs: head groups and token runs

CHUNK_ATOL = 1e-5  # matmuls over fewer rows or columns may sum in another order: equal up to float32 rounding


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _record_widths(model, names):
    """Output widths of every call of the named submodules; call `remove()` on the returned handles."""
    widths, handles = {n: [] for n in names}, []
    for n in names:
        hook = lambda m, a, out, n=n: widths[n].append(out.shape[-1])  # noqa: E731
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    return widths, handles


def _random_dit(num_heads: int) -> tuple[StepVideoModel, list[torch.Tensor]]:
    """A one-block DiT with random weights and matching inputs (batch 2, ragged text mask)."""
    config = DiTConfig(num_layers=1, num_heads=num_heads, in_channels=4, out_channels=4, caption_channels=(16, 8))
    model = StepVideoModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    mask = torch.ones(2, 8)
    mask[1, 6:] = 0
    inputs = [torch.randn(2, 2, 4, 3, 4), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 16), torch.randn(2, 3, 8), mask]
    return model, inputs


def test_head_and_token_chunking_same_result(fixture_dir):
    model, t = _load(fixture_dir)
    heads = model.config.num_heads
    with torch.inference_mode():
        plain = model(*_inputs(t))
        for group, tokens in ((1, None), (1, 7), (max(heads - 1, 1), 4), (heads, 1), (heads + 3, None), (None, 13)):
            set_attention_head_chunk(model, group)
            set_token_chunk(model, tokens)
            chunked = model(*_inputs(t))
            assert _max_diff(chunked, plain) <= CHUNK_ATOL, (group, tokens)
            _close(chunked, t["out.x"])


def test_head_groups_project_only_their_rows():
    """5 heads in groups of 2: q/k/v of each group come from the group's own rows of the fused weights."""
    model, inputs = _random_dit(5)
    names = ["transformer_blocks.0.attn1.wqkv", "transformer_blocks.0.attn2.wq", "transformer_blocks.0.attn2.wkv"]
    widths, handles = _record_widths(model, names)
    with torch.inference_mode():
        plain = model(*inputs)
        calls_plain = [list(w) for w in widths.values()]
        for w in widths.values():
            w.clear()
        set_attention_head_chunk(model, 2)
        chunked = model(*inputs)
    for h in handles:
        h.remove()
    assert calls_plain == [[5 * 384], [5 * 128], [5 * 256]]
    assert list(widths.values()) == [[768, 768, 384], [256, 256, 128], [512, 512, 256]]  # heads 2 + 2 + 1
    assert _max_diff(chunked, plain) <= CHUNK_ATOL


def test_head_groups_slice_quantized_linears(fixture_dir):
    from lowvram_stepvideo.models.quant import QuantLinear, get_format, plan_quantization, quantize_model
    model, t = _load(fixture_dir)
    names = [n for n, _ in model.named_parameters()]
    quantize_model(model, get_format("int8"), plan_quantization("transformer", names))
    assert isinstance(model.transformer_blocks[0].attn1.wqkv, QuantLinear)
    heads = model.config.num_heads
    with torch.inference_mode():
        plain = model(*_inputs(t))
        set_attention_head_chunk(model, 1)
        widths, handles = _record_widths(model, ["transformer_blocks.0.attn1.wqkv", "transformer_blocks.0.attn2.wkv"])
        chunked = model(*_inputs(t))
    for h in handles:
        h.remove()
    assert list(widths.values()) == [[384] * heads, [256] * heads]
    assert _max_diff(chunked, plain) <= CHUNK_ATOL


def test_row_projector_slices_per_row_layers_and_falls_back():
    x = torch.randn(3, 6)

    class TensorScaled(torch.nn.Module):  # one scale for the whole weight: its rows cannot be taken alone
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(10, 6))
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight * self.scale)

    for layer, calls_expected in ((torch.nn.Linear(6, 10), [3, 7]), (TensorScaled(), [10])):
        with torch.no_grad():
            full = layer(x)
            widths, handles = _record_widths(layer, [""])
            part = row_projector(layer, x)
            got = torch.cat([part(0, 3), part(3, 10)], dim=-1)
        handles[0].remove()
        assert widths[""] == calls_expected
        torch.testing.assert_close(got, full, rtol=0, atol=1e-6)


def test_chunked_blocks_leave_their_input_untouched(fixture_dir):
    """Blocks update their own tensors in place; the hidden state they were given must stay as it was."""
    model, t = _load(fixture_dir)
    seen = []
    pre = [b.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[0].clone())))
           for b in model.transformer_blocks]
    with torch.inference_mode():
        for group, tokens in ((None, None), (1, 5)):
            set_attention_head_chunk(model, group)
            set_token_chunk(model, tokens)
            model(*_inputs(t))
    for h in pre:
        h.remove()
    assert len(seen) == 2 * len(model.transformer_blocks)
    assert all(torch.equal(given, copy) for given, copy in seen)


def test_knob_setters_reach_every_module_and_validate():
    model, _ = _random_dit(2)
    set_token_chunk(model, 64)
    set_attention_head_chunk(model, 1)
    block = model.transformer_blocks[0]
    assert [m.chunk_tokens for m in (model, block, block.attn1, block.attn2, block.ff)] == [64] * 5
    assert (block.attn1.head_chunk, block.attn2.head_chunk) == (1, 1)
    set_attention_head_chunk(model, None)
    assert (block.attn1.head_chunk, block.attn2.head_chunk) == (None, None)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive"):
            set_attention_head_chunk(model, bad)


def _fused_attention(q, k, v, mask=None):
    return torch.empty_like(q)  # what the memory planner models: a fused kernel allocating only its output


def _block_peak_units(block, seq: int, tokens, heads) -> float:
    """Peak bytes of the tensors alive during one block forward on fake tensors (plan.py's accounting), the input
    hidden state included, in units of one (1, seq, D) bf16 tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowvram_stepvideo.planning.byte_count import ByteAccountant
    set_token_chunk(block, tokens)
    set_attention_head_chunk(block, heads)
    acc, dim = ByteAccountant(), block.dim
    with FakeTensorMode(allow_non_fake_inputs=True):
        small = [torch.empty(shape, dtype=torch.bfloat16, device="meta") for shape in
                 ((1, 20, dim), (1, 6 * dim), (seq, 128), (seq, 128))]  # enc, mod, rope cos, sin
        with acc, torch.inference_mode():
            h = torch.empty(1, seq, dim, dtype=torch.bfloat16, device="meta")
            block(h, small[0], small[1], None, small[2], small[3])
    return acc.peak["meta"] / (seq * dim * 2)


def test_chunking_bounds_block_activations():
    """Knobs off: whole-sequence temporaries (~11 units). Token runs: input, modulated input, fused qkv (3) and
    attention output. Token runs + head groups of g: 3 units (input, modulated input, attention buffer) plus one
    group's q/k/v and output (4g/H). Slack: per-run temporaries and a weight view the accountant counts
    (the FFN weight is 0.25 units here)."""
    heads, seq, slack = 8, 16384, 0.25
    block = build_on_meta(lambda: StepVideoTransformerBlock(DiTConfig(num_layers=1, num_heads=heads)))
    block = block.to(torch.bfloat16)
    for m in block.modules():
        if hasattr(m, "attend"):
            m.attend = _fused_attention
    assert _block_peak_units(block, seq, None, None) >= 10
    assert _block_peak_units(block, seq, 2048, None) <= 6 + slack
    for group in (1, 2):
        assert _block_peak_units(block, seq, 2048, group) <= 3 + 4 * group / heads + slack, group


# ------------------------------------------------------------------ full size

def test_full_size_state_dict_matches_release_manifest():
    config = DiTConfig.from_file(RELEASE_MODEL / "transformer" / "config.json")
    model = build_on_meta(lambda: StepVideoModel(config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest_shapes("transformer")
    assert len(shapes) == 785
    assert sum(math.prod(s) for s in shapes.values()) == 29_342_478_400
    assert not list(model.buffers())


# ------------------------------------------------------------------ bf16 quirks (docs/STEPVIDEO.md §3.4)

def test_q1_mask_sum_in_mask_dtype():
    mask = torch.cat([torch.ones(2, 257), torch.zeros(2, 140)], dim=1)  # 77 CLIP + 180 step_llm tokens, padded
    kv_lens, keys = cross_attention_mask(mask.bfloat16())
    assert kv_lens.tolist() == [256, 256] and keys.sum(1).tolist() == [256, 256]   # bf16 sum rounds 257 to 256
    kv_lens, keys = cross_attention_mask(mask.long())
    assert kv_lens.tolist() == [257, 257] and keys.sum(1).tolist() == [257, 257] and keys.shape == (2, 397)
    kv_lens, _ = cross_attention_mask(torch.cat([torch.ones(1, 259), torch.zeros(1, 138)], dim=1).bfloat16())
    assert kv_lens.tolist() == [260]                                    # ... and 259 to 260 (one pad token)


def _sinusoid_f64(s: float) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    return torch.cat([torch.cos(s * freqs), torch.sin(s * freqs)])


def test_q2_timestep_times_1000_in_timestep_dtype(fixture_dir):
    model, _ = _load(fixture_dir)
    cap = {}
    model.adaln_single.emb.time_proj.register_forward_hook(lambda m, a, out: cap.update(s=a[0], sin=out))
    with torch.inference_mode():
        model.adaln_single(torch.tensor([0.790323]).bfloat16(), torch.float32)
    assert cap["s"].item() == 788.0
    assert (cap["sin"][0].double() - _sinusoid_f64(788.0)).abs().max() < 1e-4
    assert (cap["sin"][0].double() - _sinusoid_f64(790.323)).abs().max() > 0.5
    with torch.inference_mode():
        model.adaln_single(torch.tensor([0.790323]), torch.float32)
    assert abs(cap["s"].item() - 790.323) < 1e-3


def test_q3_rope_angles_rounded_to_activation_dtype():
    frames, height, width = 40, 2, 62
    cos, sin = rope_tables(frames, height, width, torch.bfloat16, "cpu")  # (S, 128)
    assert cos.dtype == torch.bfloat16 and cos.shape == (frames * height * width, 128)
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    ref_bf16, ref_f32 = [], []
    for pos, dim in zip((f, h, w), (64, 32, 32)):
        inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = (pos.flatten()[:, None].double() * inv).float()          # (S, dim/2) float32 angles
        ref_f32.append(torch.cat([angles, angles], -1).double())
        rounded = angles.bfloat16().double()
        ref_bf16.append(torch.cat([rounded, rounded], -1))
    ref_bf16, ref_f32 = torch.cat(ref_bf16, -1), torch.cat(ref_f32, -1)
    one_ulp = 2.0 ** -8  # bf16 spacing in [0.5, 1)
    for got, fn in ((cos, torch.cos), (sin, torch.sin)):
        assert (got.double() - fn(ref_bf16)).abs().max() <= one_ulp
        assert (got.double() - fn(ref_f32)).abs().max() > 8 * one_ulp  # float32 angles would give other tables


def test_q4_rmsnorm_normalises_in_float32_then_scales_in_activation_dtype(fixture_dir):
    model, _ = _load(fixture_dir, torch.bfloat16)
    norms = [m for n, m in model.named_modules() if n.endswith(("q_norm", "k_norm"))]
    assert len(norms) == 4 * len(model.transformer_blocks)
    assert all(isinstance(m, RMSNorm) and m.eps == 1e-6 for m in norms)
    norm = model.transformer_blocks[0].attn1.q_norm
    x = torch.randn(64, 2, 128).bfloat16() * 3
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        got = norm(x)
    assert torch.equal(got, normed.bfloat16() * norm.weight)
    assert not torch.equal(got, (normed * norm.weight.float()).bfloat16())  # scaling in float32 rounds differently


def test_q5_sinusoid_float32_then_cast(fixture_dir):
    """The fixture timesteps (0.25, 0.9) give t*1000 = 250 and 900 exactly in bf16, so the bf16 model's linear_1
    input must be the float32 reference sinusoid rounded to bf16."""
    model, t = _load(fixture_dir, torch.bfloat16)
    cap = {}
    linear_1 = model.adaln_single.emb.timestep_embedder.linear_1
    linear_1.register_forward_pre_hook(lambda m, a: cap.update(x=a[0]))
    model.adaln_single.emb.time_proj.register_forward_hook(lambda m, a, out: cap.update(sin=out))
    with torch.inference_mode():
        model.adaln_single(t["in.timestep"].bfloat16(), torch.bfloat16)
    assert cap["sin"].dtype == torch.float32
    assert torch.equal(cap["x"], t["inter.timestep_sinusoid"].bfloat16())


def test_bf16_run_stays_close_to_float32_reference(fixture_dir):
    model, t = _load(fixture_dir, torch.bfloat16)
    with torch.inference_mode():
        out = model(*_inputs(t, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = t["out.x"]
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.03, f"bf16 relative L2 error {rel:.3g}"
