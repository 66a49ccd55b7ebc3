"""step_cache.FirstBlockCache against the uncached DiT: same result when it never reuses, the reuse rules (first and
last step, cap, one decision per step for every branch), and under block streaming (skipped blocks are not
fetched)."""
import pytest
import torch

from conftest import tiny_dit
from lowvram_stepvideo.models.dit import StepVideoModel
from lowvram_stepvideo.engines.placement import attach_streaming, offload_component
from lowvram_stepvideo.pipeline.sampling import cfg_combine, euler_step, flow_sigmas
from lowvram_stepvideo.engines.step_cache import FirstBlockCache, relative_change

STEPS = 8
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dit(layers: int = 4) -> StepVideoModel:
    return tiny_dit(layers, 0.02)


def _denoise(dit, cache: FirstBlockCache | None, steps: int = STEPS, read=None, uncond_scale: float = 1.0) -> torch.Tensor:
    """Sequential CFG Euler steps like the pipeline's, with the cache told the step and the branch; `read` as the
    pipeline hands it; the uncond branch's latents times `uncond_scale` ** step (a branch that changes a lot)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 4, 4, generator=g)
    text = [(torch.randn(1, 5, 16, generator=g), torch.randn(1, 3, 8, generator=g)) for _ in range(2)]
    sigmas = flow_sigmas(steps, 13.0)
    with torch.no_grad():
        for i in range(steps):
            if cache:
                cache.start_step(i, steps, read)
            v = []
            for name, (y, clip) in zip(("cond", "uncond"), text):
                with cache.branch(name) if cache else torch.no_grad():
                    scale = uncond_scale ** i if name == "uncond" else 1.0
                    v.append(dit(x * scale, sigmas[i].reshape(1), y, clip, None))
            x = euler_step(x, cfg_combine(v[0], v[1], 9.0), sigmas[i], sigmas[i + 1])
    return x


def test_a_cache_that_never_reuses_gives_the_uncached_result():
    dit = _dit()
    plain = _denoise(dit, None)
    cache = FirstBlockCache(threshold=1e-12).attach(dit)
    cached = _denoise(dit, cache)
    assert torch.equal(cached, plain)
    assert cache.counts()["full"] == 2 * STEPS and cache.counts()["cached"] == 0
    cache.detach()
    assert "forward_blocks" not in dit.__dict__


def test_reuse_respects_first_and_last_step_and_the_cap():
    dit = _dit()
    plain = _denoise(dit, None)
    cache = FirstBlockCache(threshold=0.99, max_reuse=2).attach(dit)
    cached = _denoise(dit, cache)
    # per branch: step 0 full, then (reuse, reuse, full) repeating, the last step (7) full:
    # steps 0F 1C 2C 3F 4C 5C 6F 7F -> 4 full, 4 cached
    assert cache.counts()["branches"] == {"cond": {"full": 4, "cached": 4}, "uncond": {"full": 4, "cached": 4}}
    err = float((cached - plain).norm() / plain.norm())
    assert 0 < err < 0.5 and torch.isfinite(cached).all()
    cache.detach()


def test_a_step_decides_once_from_its_first_branch_and_reads_the_device_once():
    """Sequential CFG: the cond branch's change decides the step, the uncond branch follows even when its own
    change is far over the threshold (its input grows 3x a step here); the decision is read once per step."""
    dit = _dit()
    reads = []

    def read(flag):
        reads.append(flag.shape)
        return bool(flag)
    cache = FirstBlockCache(threshold=0.99, max_reuse=2).attach(dit)
    _denoise(dit, cache, read=read, uncond_scale=3.0)
    assert cache.counts()["branches"] == {"cond": {"full": 4, "cached": 4}, "uncond": {"full": 4, "cached": 4}}
    assert reads == [torch.Size([])] * 4 and cache.decisions == 4     # steps 1, 2, 4, 5
    cache.detach()


def test_threshold_decides_from_the_relative_change_of_block_0():
    a = torch.ones(2, 3, 4)
    assert relative_change(a * 1.1, a) == pytest.approx(0.1, rel=1e-6)
    assert relative_change(a, a, rows=1) == 0.0


def test_streamed_blocks_that_are_skipped_are_not_fetched():
    resident, streamed = _dit(), _dit()
    reference = FirstBlockCache(threshold=0.99).attach(resident)
    expected = _denoise(resident, reference)
    engine = attach_streaming(streamed, "cpu", resident=0, prefetch=0, source="ram")
    cache = FirstBlockCache(threshold=0.99).attach(streamed)
    got = _denoise(streamed, cache)
    assert torch.equal(got, expected)
    counts = cache.counts()
    assert counts["cached"] > 0
    blocks = len(streamed.transformer_blocks)
    # a reusing forward fetches block 0 at most (it may still be in the slot): never the blocks it skips
    assert engine.stats.forwards == counts["full"] + counts["cached"]
    assert engine.stats.blocks_fetched <= counts["full"] * blocks + counts["cached"]
    assert engine.stats.blocks_fetched < engine.stats.forwards * blocks
    cache.detach()
    offload_component(streamed)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threshold must be > 0"):
        FirstBlockCache(threshold=0.0).attach(_dit(1))
    with pytest.raises(ValueError, match="max_reuse must be >= 1"):
        FirstBlockCache(threshold=0.1, max_reuse=0).attach(_dit(1))
