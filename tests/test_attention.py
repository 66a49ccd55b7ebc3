"""Attention backends: sdpa against an explicit softmax, masked flash/sage path, unavailable backends."""
import logging

import pytest
import torch
from torch import nn

from lowvram_stepvideo.engines import attention as A


def _reference(q, k, v, mask=None):
    """Explicit float64 softmax attention; q (B, Sq, H, D), k/v (B, Sk, H, D), mask (B, Sk) bool."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _qkv(b=2, sq=9, sk=7, h=3, d=16):
    return torch.randn(b, sq, h, d), torch.randn(b, sk, h, d), torch.randn(b, sk, h, d)


def test_sdpa_matches_softmax_reference_without_mask():
    q, k, v = _qkv()
    out = A.attention(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _reference(q, k, v), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask_rows", [[[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],   # key-prefix (DiT)
                                       [[1, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 1, 1]]])  # arbitrary
def test_sdpa_matches_softmax_reference_with_key_mask(mask_rows):
    q, k, v = _qkv()
    mask = torch.tensor(mask_rows, dtype=torch.bool)
    out = A.attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), rtol=0, atol=1e-5)
    # masked keys must not matter at all
    k2, v2 = k.clone(), v.clone()
    k2[~mask], v2[~mask] = 100.0, -100.0
    torch.testing.assert_close(A.attention(q, k2, v2, mask), out, rtol=0, atol=1e-6)


def test_masked_kernel_path_selects_keys_per_batch(monkeypatch):
    """flash/sage take no mask: the per-batch key selection must equal masked attention."""
    calls = []

    def fake_kernel(name, q, k, v):
        calls.append(k.shape[1])
        return A.sdpa(q, k, v)

    monkeypatch.setattr(A, "is_available", lambda name: True)
    monkeypatch.setattr(A, "_run_kernel", fake_kernel)
    q, k, v = _qkv()
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = A.attention(q, k, v, mask, backend="flash")
    assert calls == [3, 6]
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_unavailable_backend_is_a_one_line_error(monkeypatch, name):
    monkeypatch.setattr(A, "_kernel", lambda n: None)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"'{name}' is not importable.*'sdpa'") as err:
        A.attention(q, k, v, backend=name)
    assert "\n" not in str(err.value)
    model = _TwoAttn()
    with pytest.raises(ValueError, match="not importable"):
        A.use_attention_backend(model, name)
    assert model.a.attend is None  # untouched after the error


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_unavailable_backend_falls_back_to_sdpa_when_asked(monkeypatch, caplog, name):
    monkeypatch.setattr(A, "_kernel", lambda n: None)
    model = _TwoAttn()
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        assert A.use_attention_backend(model, name, fallback=True).value == "sdpa"
    assert model.a.attend is A.sdpa and model.b.attend is A.sdpa
    assert any(name in r.getMessage() for r in caplog.records)


def test_unknown_backend_and_cpu_float32_kernel_are_errors(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        A.attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="unknown"):
        A.use_attention_backend(_TwoAttn(), "xformers", fallback=True)
    monkeypatch.setattr(A, "_kernel", lambda n: (lambda *a, **kw: pytest.fail("kernel must not run")))
    with pytest.raises(ValueError, match="needs CUDA fp16/bf16"):
        A.attention(q, k, v, backend="sage")


def test_use_attention_backend_sets_every_attention_module(monkeypatch):
    monkeypatch.setattr(A, "_kernel", lambda n: (lambda *a, **kw: None))
    model = _TwoAttn()
    handle = A.use_attention_backend(model, "flash", card=A.Target(None))
    assert handle.value == "flash2"                                   # flash-attn 3 is Hopper-only
    assert model.a.attend.keywords == {"backend": "flash2"} and model.b.attend.keywords == {"backend": "flash2"}
    handle.detach()
    assert model.a.attend is None and model.b.attend is None          # each module's own value back
    assert A.use_attention_backend(model, "flash", card=A.Target((9, 0), "NVIDIA H100")).value == "flash3"
    with pytest.raises(ValueError, match="no attention modules"):
        A.use_attention_backend(nn.Linear(2, 2), "sdpa")


class _TwoAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Module(), nn.Module()
        self.a.attend = self.b.attend = None


RTX_4090 = A.Target((8, 9), "NVIDIA GeForce RTX 4090")
RTX_3090 = A.Target((8, 6), "NVIDIA GeForce RTX 3090")
A100 = A.Target((8, 0), "NVIDIA A100-SXM4-80GB")
H100 = A.Target((9, 0), "NVIDIA H100 80GB HBM3")
L40 = A.Target((8, 9), "NVIDIA L40S")


@pytest.mark.parametrize("card, importable, expected", [
    (RTX_4090, {"flash2", "flash3", "sage"}, "sage"),      # consumer 8.x: SageAttention first
    (RTX_3090, {"flash2"}, "flash2"),
    (RTX_3090, set(), "sdpa"),
    (A100, {"flash2", "sage"}, "flash2"),                  # datacenter 8.x: full-rate accumulation, flash first
    (L40, {"flash2", "sage"}, "flash2"),
    (H100, {"flash2", "flash3", "sage"}, "flash3"),        # Hopper: flash-attn 3
    (H100, {"flash2", "sage"}, "sage"),
    (H100, {"flash2"}, "flash2"),
    (A.Target(None, "cpu"), {"flash2", "flash3", "sage"}, "sdpa"),
])
def test_auto_picks_per_card(card, importable, expected):
    kernel, why = A.choose_auto(card, lambda k: k in importable)
    assert kernel == expected and why and "\n" not in why


def test_auto_uses_the_injected_card_and_packages(monkeypatch):
    monkeypatch.setattr(A, "_kernel", lambda n: (lambda *a, **kw: None) if n in ("sage", "flash2") else None)
    model = _TwoAttn()
    handle = A.use_attention_backend(model, "auto", card=RTX_4090)
    assert handle.value == "sage" and model.a.attend.keywords == {"backend": "sage"}
    handle.detach()
    assert A.use_attention_backend(model, "auto", card=A100).value == "flash2"
    assert A.choose_backend("auto", A.Target(None), fallback=True)[0] == "sdpa"


def test_masked_sage_call_runs_exact_sdpa(monkeypatch):
    monkeypatch.setattr(A, "_run_kernel", lambda *a: pytest.fail("a masked call must not reach SageAttention"))
    monkeypatch.setattr(A, "is_available", lambda name: True)
    q, k, v = _qkv()
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = A.attention(q, k, v, mask, backend="sage")
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), rtol=0, atol=1e-5)
