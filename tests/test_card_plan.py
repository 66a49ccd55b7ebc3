"""The memory plan counts the attention kernel the target card runs: a fused kernel, on float16 copies of q, k and v
where the card has a fused kernel for float16 but none for the compute dtype (bf16 on Turing), SDPA's math kernel and
its scores where it has no fused kernel at all."""
import pytest
import torch

from lowvram_stepvideo.loading import demo
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.models.layers import sdpa
from lowvram_stepvideo.planning import fit
from lowvram_stepvideo.planning.byte_count import DEVICE, PlanningAccountant
from lowvram_stepvideo.planning.plan import plan_memory
from lowvram_stepvideo.engines.attention import math_kernel_stand_in as math_kernel_attention
from lowvram_stepvideo.engines.attention import output_only as flash_style_attention
from lowvram_stepvideo.engines.attention import HALF_OUTPUT_ONLY as half_flash_style_attention
from lowvram_stepvideo.engines.attention import planned_kernel


def planned_attention(capability, dtype):
    return planned_kernel("sdpa", capability, dtype)
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides

GiB = 2**30
PRESET = Preset(17, 272, 496, 1)          # 3 latent frames of 17 x 31: 1581 DiT tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return open_model_folder(demo.build_demo_model(tmp_path_factory.mktemp("demo") / "demo"))


def test_the_math_stand_in_computes_attention():
    """The stand-in is SDPA's math kernel step by step: on real tensors it gives SDPA's result, masked or not."""
    q, k, v = (torch.randn(2, 40, 3, 16) for _ in range(3))
    mask = torch.rand(2, 40) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(math_kernel_attention(q, k, v, mask), sdpa(q, k, v, mask))
    torch.testing.assert_close(math_kernel_attention(q, k, v), sdpa(q, k, v))


@pytest.mark.parametrize("inference", [True, False])
def test_the_math_stand_in_holds_float32_scores_and_softmax(inference):
    """bf16 inputs: the scores and their softmax, both float32, alive at once (8 bytes a score), under inference
    mode too (where SDPA's math op reaches a dispatch mode whole, hiding its temporaries)."""
    acc = PlanningAccountant()
    b, s, h, d = 1, 1000, 2, 64
    with torch.inference_mode(inference), acc:
        q = torch.empty(b, s, h, d, dtype=torch.bfloat16, device=torch.device("meta", 0))
        acc.reset_peak()
        before = acc.total(DEVICE)
        math_kernel_attention(q, q, q)
    extra = acc.peak[DEVICE] - before
    assert 8 * b * h * s * s <= extra <= 9.5 * b * h * s * s


def test_which_stand_in_a_card_gets():
    assert planned_attention((7, 5), torch.bfloat16) is half_flash_style_attention     # float16 copies, fused
    assert planned_attention((7, 0), torch.bfloat16) is half_flash_style_attention
    assert planned_attention((3, 7), torch.bfloat16) is math_kernel_attention           # no fused kernel at all
    assert planned_attention((7, 5), torch.float16) is flash_style_attention
    assert planned_attention((7, 5), torch.float32) is flash_style_attention
    assert planned_attention((8, 6), torch.bfloat16) is flash_style_attention
    assert planned_attention(None, torch.bfloat16) is flash_style_attention


def test_turing_plans_float16_attention_and_a_card_without_fused_kernels_the_scores(folder):
    """sm75 in bf16 runs attention on float16 copies (engines/attention_paths.HalfPrecision): the denoise peak grows
    by at most those copies and the float16 output of one head group, never by the scores. A card with no fused
    kernel (sm37 here: none in the card table) plans the float32 scores and their softmax. sm86, fp16 on sm75 and an
    unknown card plan the fused kernel alone. (Before Turing ran float16 attention, sm75 planned the scores.)"""
    profile = load_profile("8gb")
    fused = plan_memory(folder, profile, PRESET).phases["denoise"].peak_vram_bytes
    turing = plan_memory(folder, profile, PRESET, capability=(7, 5)).phases["denoise"].peak_vram_bytes
    no_fused = plan_memory(folder, profile, PRESET, capability=(3, 7)).phases["denoise"].peak_vram_bytes
    tokens, heads = PRESET.tokens, min(profile.attention_head_chunk, 2)   # the demo DiT has 2 heads of 128
    assert 0 <= turing - fused <= 4 * 2 * heads * tokens * 128
    assert no_fused - fused >= 8 * heads * tokens * tokens
    assert plan_memory(folder, profile, PRESET, capability=(8, 6)).phases["denoise"].peak_vram_bytes == fused
    fp16 = with_overrides(profile, compute_dtype="float16")
    assert (plan_memory(folder, fp16, PRESET, capability=(7, 5)).phases["denoise"].peak_vram_bytes
            == plan_memory(folder, fp16, PRESET).phases["denoise"].peak_vram_bytes)


def test_the_float16_stand_in_holds_the_copies():
    """The planner's float16 path allocates what the run's does: float16 q, k, v and output, then the output in the
    compute dtype (q, k, v freed first), and v's two 0-d float32 scales."""
    acc = PlanningAccountant()
    b, s, h, d = 1, 1000, 2, 128
    with torch.inference_mode(), acc:
        q = torch.empty(b, s, h, d, dtype=torch.bfloat16, device=torch.device("meta", 0))
        acc.reset_peak()
        before = acc.total(DEVICE)
        out = half_flash_style_attention(q, q, q)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert acc.peak[DEVICE] - before == 4 * 2 * b * s * h * d + 2 * 4


def test_the_verdict_plans_for_the_budgets_card(folder, monkeypatch):
    """check_fit hands the card's capability to every plan it makes (first fit, layout, untiled decode)."""
    seen = []
    original = fit.fit_profile

    def spy(*args, **kwargs):
        seen.append(kwargs.get("capability"))
        return original(*args, **kwargs)
    monkeypatch.setattr(fit, "fit_profile", spy)
    profile = load_profile("8gb")
    verdict = fit.check_fit(folder, profile, PRESET, 8 * GiB, 32 * GiB, capability=(7, 5))
    assert verdict.budget.capability == (7, 5) and seen and set(seen) == {(7, 5)}


def test_a_cached_plan_is_not_served_to_a_card_with_another_matmul(tmp_path, monkeypatch):
    """An fp8 release with matmul "fast" runs fp8 x fp8 on an RTX 4090 (8.9) and weight-only on an RTX 3090 (8.6),
    whose expanded weights make the denoise peak higher; the 3090's plan, made after the 4090's in one process (the
    web page's Check fit for two cards), is its own, as a fresh process plans it. Measured on the release at
    17x272x496: 9.24 GiB (4090) and 9.50 GiB (3090); served the 4090's trace, the 3090 was planned 276 MB short."""
    from lowvram_stepvideo.files.releases import published_release
    from lowvram_stepvideo.loading.model_folder import open_published
    from lowvram_stepvideo.planning import plan
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    monkeypatch.setattr(plan, "_TRACES", {})
    folder = open_published(published_release("stepfun-ai/stepvideo-t2v"))
    profile = with_overrides(load_profile("24gb"), matmul="fast")

    def denoise_peak(capability) -> int:
        return plan.plan_memory(folder, profile, PRESET, "fp8", capability=capability).phases["denoise"].peak_vram_bytes
    rtx_4090, rtx_3090 = denoise_peak((8, 9)), denoise_peak((8, 6))
    monkeypatch.setattr(plan, "_TRACES", {})
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path / "fresh"))
    assert rtx_3090 == denoise_peak((8, 6)) and rtx_3090 > rtx_4090
