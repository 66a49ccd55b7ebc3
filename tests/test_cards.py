"""The card table (engines/cards.py): its invariants, the throughput formula against NVIDIA's published headline
figures, what each architecture runs, and finding a card by name or by what torch reports."""
import pytest

from lowvram_stepvideo.engines import cards, fast_matmul
from lowvram_stepvideo.engines.cards import CARDS, attention_order, capabilities, card_by_name, card_for_device

GiB = 2**30


def test_every_card_is_complete_and_named_once():
    names = [cards._key(c.name) for c in CARDS]
    assert len(names) == len(set(names))
    for c in CARDS:
        assert c.capability in cards.ARCHS, c.name
        assert c.vram_gib > 0 and c.memory_gbs > 0, c.name
        assert c.pcie[0] in (3, 4, 5) and c.pcie[1] in (8, 16), c.name
        assert (c.sms and c.boost_mhz) or c.datasheet_tflops, c.name
        assert c.tflops("fp16") > 0 and c.tflops("fp32") > 0, c.name
        assert (c.tflops("bf16") > 0) == (c.capability >= (8, 0)), c.name    # bf16 tensor cores from Ampere
        assert (c.tflops("fp8") > 0) == (c.capability >= (8, 9)), c.name     # fp8 from Ada
        assert (c.tflops("int8") > 0) == (c.capability >= (7, 5)), c.name    # Volta has no int8 tensor cores


@pytest.mark.parametrize("name, kind, published", [
    ("V100 16GB", "fp16", 125), ("V100 16GB", "fp32", 15.7),                 # V100 SXM2 datasheet
    ("T4", "fp16", 65), ("T4", "int8", 130),                                  # T4 datasheet
    ("RTX 2060", "fp32", 6.45),                                               # RTX 2060: 6.5 TFLOPS FP32
    ("A100 80GB", "bf16", 312), ("A100 80GB", "int8", 624), ("A100 80GB", "fp32", 19.5),
    ("A10", "bf16", 125), ("A10", "int8", 250),                               # A10 datasheet (dense)
    ("RTX A6000", "bf16", 154.8),                                             # 309.7 with sparsity
    ("RTX 3090", "bf16", 71), ("RTX 3090", "int8", 284), ("RTX 3090", "fp32", 35.6),   # GA102 whitepaper
    ("RTX 4090", "bf16", 165.2), ("RTX 4090", "fp8", 330.3), ("RTX 4090", "int8", 660.6),  # Ada whitepaper
    ("RTX 4090", "fp32", 82.6),
    ("L4", "bf16", 121), ("L4", "fp8", 242.5),                                # L4 datasheet (dense)
    ("RTX 5090", "bf16", 209.5), ("RTX 5090", "fp8", 419), ("RTX 5090", "int8", 838),   # RTX Blackwell
    ("RTX 5090", "fp32", 104.8),
])
def test_the_formula_gives_the_published_figures(name, kind, published):
    assert card_by_name(name).tflops(kind) == pytest.approx(published, rel=0.012)


def test_geforce_cards_run_fp32_accumulate_at_half_rate():
    """The whitepapers: RTX 3090 142 TFLOPS with fp16 accumulate, 71 with fp32; int8 is not halved."""
    geforce, pro = card_by_name("RTX 3090"), card_by_name("RTX A6000")
    assert geforce.tflops_fp16_accumulate() == pytest.approx(2 * geforce.tflops("bf16"))
    assert pro.tflops_fp16_accumulate() == pytest.approx(pro.tflops("bf16"))
    per_clock = lambda c, kind: c.tflops(kind) / (c.sms * c.boost_mhz)   # noqa: E731
    assert per_clock(geforce, "int8") == pytest.approx(per_clock(pro, "int8"))


def test_host_link_bandwidth():
    assert card_by_name("RTX 4090").host_link_gbs == pytest.approx(31.5, rel=0.01)   # PCIe 4.0 x16
    assert card_by_name("RTX 4060").host_link_gbs == pytest.approx(15.75, rel=0.01)  # PCIe 4.0 x8
    assert card_by_name("T4").host_link_gbs == pytest.approx(15.76, rel=0.01)        # PCIe 3.0 x16


def test_turing_has_no_bf16_fused_attention():
    caps = capabilities((7, 5))
    assert not caps.bf16_fused_attention and caps.fp16_fused_attention
    assert caps.attention_dtype == "float16" and caps.attention_kernels == ("sdpa",)
    assert not caps.bf16_tensor_cores and caps.notes
    assert cards.fused_attention((7, 5), "bfloat16") is False
    assert cards.fused_attention((7, 5), "float16") and cards.fused_attention((7, 5), "float32")
    assert cards.fused_attention(None, "bfloat16")              # the CPU: PyTorch's CPU flash kernel


@pytest.mark.parametrize("cap, kernels", [
    ((7, 0), ("sdpa",)), ((8, 0), ("sage", "flash2", "sdpa")), ((8, 6), ("sage", "flash2", "sdpa")),
    ((8, 9), ("sage", "flash2", "sdpa")), ((9, 0), ("flash3", "sage", "flash2", "sdpa")), ((10, 0), ("sdpa",)),
    ((12, 0), ("sage", "flash2", "sdpa")),
])
def test_attention_kernels_per_architecture(cap, kernels):
    caps = capabilities(cap)
    assert set(caps.attention_kernels) == set(kernels) and caps.attention_kernels[-1] == "sdpa"
    assert caps.bf16_fused_attention == (cap >= (8, 0))


def test_fast_matmuls_follow_the_kernel_table():
    """One source of truth with engines/fast_matmul.py: int8 x int8 from 8.0, fp8 x fp8 from 8.9."""
    for cap in cards.ARCHS:
        caps = capabilities(cap)
        assert caps.int8_mm == (cap >= fast_matmul.KERNEL_TABLE["int8"][0])
        assert caps.fp8_mm == (cap >= fast_matmul.KERNEL_TABLE["fp8"][0])


def test_auto_order_puts_sageattention_first_on_every_geforce_card():
    """RTX 50xx (12.0) included: the consumer rule is about half-rate fp32 accumulate, not major version 8."""
    for c in CARDS:
        order = attention_order(c.capability, c.geforce)
        assert order[-1] == "sdpa"
        if c.geforce and "sage" in capabilities(c.capability).attention_kernels:
            assert order[0] == "sage", c.name
    assert attention_order((12, 0), True)[:2] == ("sage", "flash2")
    assert attention_order((8, 6), False)[0] == "flash2"          # A10, RTX A6000: full-rate bf16
    assert attention_order((9, 0), False)[0] == "flash3"
    assert attention_order((7, 5), True) == ("sdpa",)


@pytest.mark.parametrize("text", ["RTX 4090", "rtx4090", "NVIDIA GeForce RTX 4090", " geforce rtx 4090 "])
def test_card_by_name(text):
    assert card_by_name(text).name == "RTX 4090"


def test_card_by_name_unknown():
    assert card_by_name("RTX 9999") is None


@pytest.mark.parametrize("device, total_gib, expected", [
    ("NVIDIA GeForce RTX 4090", 23.6, "RTX 4090"), ("Tesla T4", 14.6, "T4"), ("NVIDIA L4", 22.0, "L4"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100 80GB"), ("NVIDIA A100-PCIE-40GB", 39.4, "A100 40GB"),
    ("NVIDIA A10", 22.0, "A10"), ("NVIDIA RTX A6000", 47.5, "RTX A6000"), ("NVIDIA H100 80GB HBM3", 79.1, "H100 SXM"),
    ("NVIDIA H100 PCIe", 79.1, "H100 PCIe"), ("NVIDIA GeForce RTX 4060 Ti", 15.6, "RTX 4060 Ti 16GB"),
    ("NVIDIA GeForce RTX 4060 Ti", 7.6, "RTX 4060 Ti"), ("NVIDIA GeForce RTX 3080", 11.8, "RTX 3080 12GB"),
    ("NVIDIA GeForce RTX 5090", 31.4, "RTX 5090"), ("Tesla V100-SXM2-16GB", 15.8, "V100 16GB"),
    ("NVIDIA RTX 6000 Ada Generation", 47.5, "RTX 6000 Ada"),
])
def test_card_for_what_torch_reports(device, total_gib, expected):
    assert card_for_device(device, int(total_gib * GiB)).name == expected


def test_card_for_an_unknown_device():
    assert card_for_device("NVIDIA GeForce GTX 1080", 8 * GiB) is None


def test_parse_capability():
    assert cards.parse_capability("8.6") == (8, 6) and cards.parse_capability(" 12.0 ") == (12, 0)
    for bad in ("86", "8.x", "sm86", "1.0", "8.10"):
        with pytest.raises(ValueError, match="compute capability like 8.6"):
            cards.parse_capability(bad)


def test_card_table_lists_every_card():
    table = cards.card_table()
    for c in CARDS:
        assert f"\n{c.name} " in table
    described = cards.describe_card(card_by_name("T4"))
    assert described["capability"] == "7.5" and described["bf16_fused_attention"] is False
    assert described["tflops"]["bf16"] == 0 and described["tflops"]["fp16"] == pytest.approx(65, rel=0.01)
