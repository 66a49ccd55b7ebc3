"""step_llm (Step1Model): reference fixtures, sqrt-ALiBi bias, tiled attention, full-size layout."""
import torch
from conftest import RELEASE_MODEL, manifest_shapes, read_io

from lowvram_stepvideo.loading.assign import build_on_meta
from lowvram_stepvideo.files.configs import StepLLMConfig
from lowvram_stepvideo.loading.loaders import load_step_llm
from lowvram_stepvideo.models import step_llm as step_llm_module
from lowvram_stepvideo.models.step_llm import Step1Model

ATOL = 1e-4


def _tiny(fixture_dir, dtype=torch.float32):
    return load_step_llm(fixture_dir / "model_dir" / "step_llm", dtype=dtype)


def _set_budget(model, budget_bytes):
    for layer in model.transformer.layers:
        layer.attention.score_budget_bytes = budget_bytes


@torch.no_grad()
def test_tiny_matches_reference(fixture_dir):
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    model = _tiny(fixture_dir)
    y = model(io["in.step_llm.input_ids"], io["in.step_llm.attention_mask"])
    torch.testing.assert_close(y, io["out.step_llm.y"], atol=ATOL, rtol=0)
    # the plain causal variant differs clearly: the sqrt-ALiBi bias is really applied
    assert (y - io["alt.step_llm.y_causal_no_alibi"]).abs().max() > 100 * ATOL


@torch.no_grad()
def test_tiny_ids_only_ragged_matches_reference(fixture_dir):
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    y = _tiny(fixture_dir)(io["in.ids_only.step_llm.input_ids"], None)
    torch.testing.assert_close(y, io["out.ids_only.step_llm.y"], atol=ATOL, rtol=0)


def test_alibi_slopes_follow_spec():
    # STEPVIDEO.md §6.1: H = 48 -> 2^(-k/4), k = 1..32, then 2^(-(2k-1)/8), k = 1..16
    want48 = [2.0 ** (-k / 4) for k in range(1, 33)] + [2.0 ** (-(2 * k - 1) / 8) for k in range(1, 17)]
    torch.testing.assert_close(step_llm_module.alibi_slopes(48), torch.tensor(want48), atol=0, rtol=1e-6)
    # H = 6 (tiny fixture): n = 4 -> 2^(-2k), k = 1..4, then 2^(-(2k-1)), k = 1..2
    want6 = [0.25, 0.0625, 2.0 ** -6, 2.0 ** -8, 0.5, 0.125]
    torch.testing.assert_close(step_llm_module.alibi_slopes(6), torch.tensor(want6), atol=0, rtol=1e-6)


@torch.no_grad()
def test_tiled_attention_equals_untiled_and_respects_budget(fixture_dir, monkeypatch):
    model = _tiny(fixture_dir)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 150))
    whole = model(ids, None)  # default budget: one tile per KV group at this size

    tiles = []
    plain_tile = step_llm_module._attend_tile

    def recording_tile(q, k, v, slopes, q_start):
        tiles.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4)  # float32 score bytes
        return plain_tile(q, k, v, slopes, q_start)

    monkeypatch.setattr(step_llm_module, "_attend_tile", recording_tile)
    budget = 2 * 150 * 4 * 7  # 7 (head, query) rows of 150 keys: splits heads and queries into ragged tiles
    _set_budget(model, budget)
    tiled = model(ids, None)
    assert len(tiles) > config.num_layers * config.num_heads  # really tiled (several query blocks per head)
    assert max(tiles) <= budget
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


@torch.no_grad()
def test_bfloat16_run_stays_close_to_float32(fixture_dir):
    io, _ = read_io(fixture_dir / "text_io.safetensors")
    ids = io["in.step_llm.input_ids"]
    ref = io["out.step_llm.y"]
    y = _tiny(fixture_dir, torch.bfloat16)(ids, None)
    assert y.dtype == torch.bfloat16
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, f"bf16 relative error {rel:.3g}"


@torch.no_grad()
def test_layers_are_called_in_order_with_one_tensor(fixture_dir):
    """A streaming engine hooks the layers: the forward must call each one, in order, with a single tensor."""
    model = _tiny(fixture_dir)
    calls = []
    for i, layer in enumerate(model.transformer.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: calls.append((i, [type(a) for a in args])))
    model(torch.tensor([[1, 5, 7, 2]]), None)
    assert calls == [(i, [torch.Tensor]) for i in range(model.config.num_layers)]


def test_full_size_names_and_shapes_match_release():
    config = StepLLMConfig.from_file(RELEASE_MODEL / "step_llm" / "config.json")
    model = build_on_meta(lambda: Step1Model(config))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest_shapes("step_llm")
