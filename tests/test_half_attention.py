"""Attention in float16 for cards without a fused bf16 kernel (Turing, Volta; engines/attention_paths.py): the
DiT's q and k are QK-normed (bounded), v is scaled by a power of two on the device so any range fits float16;
numerics against the exact path on the fixture DiT, and no host read."""
import pytest
import torch

from test_dit import _inputs, _load
from test_syncs import HostReads
from lowvram_stepvideo.engines import attention_paths
from lowvram_stepvideo.engines.attention import attach_attention
from lowvram_stepvideo.engines.attention_paths import HalfPrecision, exact_attention, v_scales
from lowvram_stepvideo.models.layers import sdpa

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16_ROUNDING = 2.0 ** -8       # relative error of rounding to bf16 (8 significant bits)
FP16_ROUNDING = 2.0 ** -11      # to float16 (11)


def _captured_calls(model, inputs) -> list[tuple]:
    """(q, k, v, mask) of every attention call of one forward."""
    calls = []

    def spy(q, k, v, mask=None):
        calls.append((q.clone(), k.clone(), v.clone(), mask))
        return sdpa(q, k, v, mask)
    handle = attach_attention(model, spy)
    with torch.inference_mode():
        model(*inputs)
    handle.detach()
    return calls


def _reference(q, k, v, mask):
    return sdpa(q.double(), k.double(), v.double(), mask)


def test_the_dits_q_and_k_are_qk_normed_in_self_and_cross_attention(fixture_dir):
    """What makes float16 safe for q and k: every (token, head) vector of q and k reaching the kernel, in self- and
    cross-attention, has the RMS of its norm's weight (1 here; RoPE rotates pairs, keeping it), so each element is
    at most sqrt(head_dim) x max |weight|. v is not normed."""
    model, t = _load(fixture_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(1.0)
    calls = _captured_calls(model, _inputs(t))
    masked = [c for c in calls if c[3] is not None]
    assert len(calls) == 2 * len(model.transformer_blocks) and len(masked) == len(model.transformer_blocks)
    for q, k, v, _ in calls:
        for x in (q, k):
            torch.testing.assert_close(x.pow(2).mean(-1).sqrt(), torch.ones(x.shape[:-1]), rtol=0, atol=1e-4)
        assert (v.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1


def test_float16_attention_on_the_fixture_dits_calls(fixture_dir):
    """Every attention call of the bf16 fixture DiT, float16 path and exact path against float64. Measured: max
    error 0.0089 (float16) and 0.0078 (exact) at outputs up to 2.9, relative 0.0017 for both; both are the output's
    rounding to bf16. Bound: max error within a bf16 rounding of the largest output plus a float16 rounding of the
    largest v; relative error within the exact path's plus one float16 rounding."""
    model, t = _load(fixture_dir, torch.bfloat16)
    for q, k, v, mask in _captured_calls(model, _inputs(t, torch.bfloat16)):
        ref = _reference(q, k, v, mask)
        half, exact = (f(q, k, v, mask).double() for f in (HalfPrecision(sdpa), exact_attention))
        assert (half - ref).abs().max() <= BF16_ROUNDING * ref.abs().max() + 2 * FP16_ROUNDING * v.abs().max()
        rel_half, rel_exact = (float((x - ref).norm() / ref.norm()) for x in (half, exact))
        assert rel_half <= rel_exact + 2 * FP16_ROUNDING


def test_float16_attention_keeps_the_fixture_dits_output(fixture_dir):
    """The bf16 fixture DiT with float16 attention against the float32 reference output. Measured relative errors:
    0.0079 (float16 attention), 0.0078 (exact float32 attention), 0.0074 (bf16 SDPA): the bf16 model's own
    rounding. Bound: 0.01, and within a quarter more than the exact path's."""
    model, t = _load(fixture_dir, torch.bfloat16)
    ref = t["out.x"].double()
    errors = {}
    for name, attend in (("half", HalfPrecision(sdpa)), ("exact", exact_attention)):
        handle = attach_attention(model, attend)
        with torch.inference_mode():
            out = model(*_inputs(t, torch.bfloat16)).double()
        handle.detach()
        errors[name] = float((out - ref).norm() / ref.norm())
    assert errors["half"] <= 0.01 and errors["half"] <= 1.25 * errors["exact"], errors


@pytest.mark.parametrize("mask", [None, torch.tensor([[1] * 10 + [0] * 6, [1] * 16], dtype=torch.bool)])
@pytest.mark.parametrize("size", [1e5, 3e4, 1.0, 1e-6, 1e30])
def test_v_of_any_range_runs_in_float16_without_a_host_read(mask, size):
    """v from 1e-6 to 1e30 (float16's largest finite value is 65504): the kernel always gets float16 inputs with
    |v| < 2, and the output is the float64 result to bf16 rounding, as the exact path's is; nothing is read back
    to the host (the check it replaced read max |v| at every call)."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 24, 3, 128, generator=g).bfloat16() for _ in range(2))
    k = k[:, :16]
    v = (torch.randn(2, 16, 3, 128, generator=g) * size).bfloat16()
    seen = []
    half = HalfPrecision(lambda q, k, v, mask: (seen.append((q.dtype, k.dtype, v.dtype, v.abs().max())),
                                                sdpa(q, k, v, mask))[1])
    with HostReads() as reads:
        out = half(q, k, v, mask)
    assert reads.reads == [] and reads.moves == []
    dtypes, largest = seen[0][:3], float(seen[0][3])
    assert dtypes == (torch.float16,) * 3 and 1 <= largest < 2 and out.dtype == torch.bfloat16
    ref = _reference(q, k, v, mask)
    assert out.isfinite().all()
    assert float((out.double() - ref).norm() / ref.norm()) <= BF16_ROUNDING
    exact = exact_attention(q, k, v, mask).double()
    assert float((out.double() - exact).norm() / exact.norm()) <= BF16_ROUNDING


def test_the_scales_are_powers_of_two_and_carry_a_nan():
    for largest, e in ((65504.0, 15), (65536.0, 16), (0.75, -1), (1.0, 0), (3e38, 127)):
        v = torch.tensor([-largest, largest / 3])
        down, up = v_scales(v)
        assert float(up) == 2.0 ** e and float(down) == 2.0 ** -e
    assert [float(s) for s in v_scales(torch.zeros(4))] == [2.0 ** 126, 2.0 ** -126]
    down, up = v_scales(torch.tensor([1.0, float("nan")]))
    assert down.isnan() and up.isnan()
    q = k = torch.randn(1, 4, 1, 8)
    v = torch.randn(1, 4, 1, 8)
    v[0, 1, 0, 0] = float("nan")
    assert HalfPrecision(sdpa)(q, k, v).isnan().any()      # a NaN reaches the step's NaN check, as exact's would


def test_the_exact_path_runs_one_head_and_a_bounded_run_of_queries_at_a_time(monkeypatch):
    """Float32 SDPA per head over at most SCORES_PER_CALL / Sk queries a call, written into an output of q's
    dtype: the float64 result up to float32 rounding."""
    calls = []
    monkeypatch.setattr(attention_paths, "SCORES_PER_CALL", 50)
    monkeypatch.setattr(attention_paths, "sdpa", lambda q, k, v, mask: (calls.append(q.shape), sdpa(q, k, v, mask))[1])
    q, k, v = torch.randn(2, 10, 3, 32), torch.randn(2, 16, 3, 32), torch.randn(2, 16, 3, 32)
    mask = torch.tensor([[1] * 9 + [0] * 7, [1] * 16], dtype=torch.bool)
    out = exact_attention(q, k, v, mask)
    assert calls == [(2, 3, 1, 32)] * 3 + [(2, 1, 1, 32)] + [(2, 3, 1, 32)] * 3 + [(2, 1, 1, 32)] + \
        [(2, 3, 1, 32)] * 3 + [(2, 1, 1, 32)]            # 3 heads x queries 0-2, 3-5, 6-8, 9 (50 // 16 = 3)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), rtol=0, atol=1e-5)
    assert exact_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16
