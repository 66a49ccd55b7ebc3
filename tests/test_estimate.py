"""How long: the work counted per phase, the estimate's arithmetic, calibration stored and used, the estimate in the
dry-run and beside the measured timings in a run's sidecar."""
import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli_support import run_cli
from lowvram_stepvideo.engines.cards import card_by_name
from lowvram_stepvideo.loading import demo
from lowvram_stepvideo.loading.model_folder import open_model_folder
from lowvram_stepvideo.planning import calibration, estimate, work
from lowvram_stepvideo.planning.estimate import estimate_run
from lowvram_stepvideo.planning.work import Work
from lowvram_stepvideo.profiles import Preset, load_profile, with_overrides
from lowvram_stepvideo.run import outputs

PRESET = Preset(17, 272, 496, 10)
TEXT_TOKENS = 77 + 320
RTX4090 = card_by_name("RTX 4090")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return open_model_folder(demo.build_demo_model(tmp_path_factory.mktemp("demo") / "demo"))


def test_a_dit_forward_counts_its_attention_and_linears(folder):
    """Attention: 4 B H Sq Sk D per block for self- (the video tokens) and cross-attention (the 397 text tokens);
    linears: each block's projections of the video tokens (14 d^2 per token) and of the text (2 d^2), plus the
    layers outside the blocks."""
    c = folder.open("transformer", layers=0).config
    s, h, d, layers = PRESET.tokens, c.num_heads, c.head_dim, c.num_layers
    got = work.dit_forward_work(folder, torch.bfloat16, PRESET.frames, PRESET.height, PRESET.width)
    assert got.attention == layers * (4 * h * s * s * d + 4 * h * s * TEXT_TOKENS * d)
    blocks = layers * (2 * s * 14 * (h * d) ** 2 + 2 * TEXT_TOKENS * 2 * (h * d) ** 2)
    assert blocks < got.linear < 1.05 * blocks
    assert got.head_dim == d


def test_work_is_kept_on_disk(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    first = work.decode_work.__wrapped__(folder, torch.bfloat16, 17, 64, 96, 0, 0)   # uncached in the process
    counted = []
    monkeypatch.setattr(work, "_counted", lambda *a: counted.append(a) or Work())
    again = work.decode_work.__wrapped__(folder, torch.bfloat16, 17, 64, 96, 0, 0)
    assert again == first and first.linear > 0 and not counted and list((tmp_path / "work").glob("*.json"))


def test_tiles_add_decoder_work(folder):
    untiled = work.decode_work(folder, torch.bfloat16, 17, 256, 384, 0, 0).linear
    tiled = work.decode_work(folder, torch.bfloat16, 17, 256, 384, 8, 2).linear
    assert tiled > untiled > 0


@pytest.fixture
def fixed_work(monkeypatch):
    """Known operations per phase (the arithmetic below is then checkable by hand)."""
    monkeypatch.setattr(estimate, "text_work", lambda folder, dtype: Work(1e13, 0.0))
    monkeypatch.setattr(estimate, "dit_forward_work", lambda folder, dtype, *size: Work(1e15, 2e15, 128))
    monkeypatch.setattr(estimate, "decode_work", lambda folder, dtype, *size: Work(3e14, 0.0))


def test_the_arithmetic(folder, fixed_work):
    """RTX 4090, bf16 165.15 TFLOPS with assumed efficiencies 60% (matmul) / 50% (attention) / 35% (VAE): a forward
    takes 1e15 / (0.6 peak) + 2e15 / (0.5 peak), a guided step two of them; ten steps ten times that (streaming
    overlaps: the demo's blocks are tiny), plus the weights read once."""
    profile = load_profile("24gb")
    est = estimate_run(folder, profile, PRESET, RTX4090)
    peak = RTX4090.tflops("bf16") * 1e12
    step = 2 * (1e15 / (0.6 * peak) + 2e15 / (0.5 * peak))
    load = est.work["loaded_bytes"] / 3e9
    assert est.seconds["denoise"] == pytest.approx(load + PRESET.steps * step)
    assert est.seconds["decode"] == pytest.approx(3e14 / (0.35 * peak))
    text = max(1e13 / (0.6 * peak), est.work["text_read_bytes"] / 3e9)    # streamed: the longer counts
    assert est.seconds["text"] == pytest.approx(text)
    assert est.total == pytest.approx(sum(est.seconds.values()))
    assert est.preset == "17x272x496@10" and not est.calibrated and est.attention_kernel == "sdpa"


def test_streaming_counts_when_it_is_the_slower(folder, fixed_work, monkeypatch):
    """With prefetch the copies overlap the compute; without it both count."""
    profile = with_overrides(load_profile("24gb"), dit_resident_blocks=0)     # both demo blocks from packed RAM
    monkeypatch.setattr(estimate, "dit_forward_work", lambda folder, dtype, *size: Work(1e9, 0.0, 128))
    streamed = estimate_run(folder, profile, PRESET, RTX4090)
    per_step = streamed.work["streamed_bytes_per_step"]
    assert per_step > 0
    link = RTX4090.host_link_gbs * 1e9 * 0.8
    load = streamed.work["loaded_bytes"] / 3e9
    compute = 2 * 1e9 / (0.6 * RTX4090.tflops("bf16") * 1e12)
    assert streamed.seconds["denoise"] == pytest.approx(load + PRESET.steps * max(compute, per_step / link))
    serial = with_overrides(profile, dit_prefetch=0)
    both = estimate_run(folder, serial, PRESET, RTX4090)
    assert both.seconds["denoise"] == pytest.approx(load + PRESET.steps * (compute + per_step / link))


def test_steps_scale_the_denoise(folder, fixed_work):
    profile = load_profile("24gb")
    ten = estimate_run(folder, profile, PRESET, RTX4090)
    fifty = estimate_run(folder, profile, replace(PRESET, steps=50), RTX4090)
    load = ten.work["loaded_bytes"] / 3e9
    assert (fifty.seconds["denoise"] - load) == pytest.approx(5 * (ten.seconds["denoise"] - load))
    assert fifty.seconds["decode"] == ten.seconds["decode"]


def test_a_parallel_run_is_estimated_per_process(folder, fixed_work):
    """CFG x2: each process runs one guided forward a step (one pass over its streamed blocks); sequence x2: each
    runs both on half the tokens and heads, plus its all-to-alls (q, k, v and the output of each block's
    self-attention, half of its half of the tokens) over the host link; the processes share the disk."""
    from lowvram_stepvideo.engines.parallel import layout_for
    profile = load_profile("24gb")
    peak, link = RTX4090.tflops("bf16") * 1e12, RTX4090.host_link_gbs * 1e9 * 0.8
    forward = 1e15 / (0.6 * peak) + 2e15 / (0.5 * peak)
    cfg = estimate_run(folder, profile, PRESET, RTX4090, layout=layout_for("cfg", 2))
    load = cfg.work["loaded_bytes"] / 3e9
    assert cfg.seconds["denoise"] == pytest.approx(2 * load + PRESET.steps * forward)
    assert cfg.work["exchanged_bytes_per_step"] == 0 and "2 processes: CFG x2, one RTX 4090 each" in cfg.notes
    seq = estimate_run(folder, profile, PRESET, RTX4090, layout=layout_for("sequence", 2))
    c = folder.open("transformer", layers=0).config
    tokens = PRESET.tokens
    exchanged = 2 * 4 * c.num_layers * (tokens / 2) * c.dim * 2 / 2     # 2 prompts, bf16, half sent
    assert seq.work["exchanged_bytes_per_step"] == pytest.approx(exchanged)
    assert seq.seconds["denoise"] == pytest.approx(2 * load + PRESET.steps * (forward + exchanged / link))


def test_fast_matmul_and_sageattention_rates(folder, fixed_work, monkeypatch):
    """int8 x int8 linears at the int8 rate (full rate on GeForce); SageAttention: QK^T at int8, PV at fp8."""
    monkeypatch.setattr(estimate.attention, "is_available", lambda name: name == "sage")
    profile = with_overrides(load_profile("24gb"), matmul="fast", weight_format="int8")
    quantized = replace(folder, weight_format="int8")
    est = estimate_run(quantized, profile, PRESET, RTX4090)
    assert est.matmul == "int8 x int8" and est.attention_kernel == "sage"
    load = est.work["loaded_bytes"] / 3e9
    attn = 1e15 / (0.5 * RTX4090.tflops("int8") * 1e12) + 1e15 / (0.5 * RTX4090.tflops("fp8") * 1e12)
    step = 2 * (1e15 / (0.6 * RTX4090.tflops("int8") * 1e12) + attn)
    assert est.seconds["denoise"] == pytest.approx(load + PRESET.steps * step)


def test_turing_bf16_is_not_estimated_but_fp16_is(folder):
    t4 = card_by_name("T4")
    bf16 = estimate_run(folder, load_profile("8gb"), PRESET, t4)
    assert bf16.total is None and bf16.seconds["denoise"] is None and "no bfloat16 tensor cores" in bf16.notes[0]
    assert bf16.attention_kernel == "sdpa (float16)"     # float16 copies on its fused kernel (the math kernel before)
    fp16 = estimate_run(folder, with_overrides(load_profile("8gb"), compute_dtype="float16"), PRESET, t4)
    assert fp16.total > 0 and fp16.attention_kernel == "sdpa"


def test_math_attention_is_estimated_from_memory_traffic(folder, fixed_work):
    """The math kernel's cost model applies where the plan counts the math kernel: a card with no fused attention
    kernel at all (compute capability 3.7 here, given tensor-core rates to be estimated). A card with fp16 tensor
    cores whose fused kernels take fp16 but not bf16 (sm75) runs bf16 attention on float16 copies: at the fp16 rate
    (until Turing ran float16 attention, that card was the math kernel's example)."""
    rates = {"bf16": 65, "fp16": 65, "int8": 130, "fp32": 8.1}
    card = replace(card_by_name("T4"), capability=(3, 7), datasheet_tflops=rates)
    est = estimate_run(folder, load_profile("8gb"), PRESET, card)
    assert est.attention_kernel == "sdpa (math kernel)"
    ops, d = 2e15, 128
    attn = ops / (8.1e12 * 0.6) + ops / (4 * d) * 18 / (card.memory_gbs * 1e9 * 0.8)
    load = est.work["loaded_bytes"] / 3e9
    assert est.seconds["denoise"] == pytest.approx(load + PRESET.steps * 2 * (1e15 / (0.6 * 65e12) + attn))
    half = estimate_run(folder, load_profile("8gb"), PRESET, replace(card, capability=(7, 5)))
    assert half.attention_kernel == "sdpa (float16)"
    assert half.seconds["denoise"] == pytest.approx(load + PRESET.steps * 2 * (1e15 / (0.6 * 65e12) + ops / (0.5 * 65e12)))


def test_no_estimate_without_a_card_or_on_the_cpu(folder):
    assert estimate_run(folder, load_profile("24gb"), PRESET, None) is None
    assert estimate_run(folder, load_profile("cpu"), PRESET, RTX4090) is None


def test_calibration_round_trip(folder, fixed_work, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    assert calibration.efficiencies(RTX4090) == (calibration.ASSUMED, False)
    profile = load_profile("24gb")
    assumed = estimate_run(folder, profile, PRESET, RTX4090)
    path = calibration.store(RTX4090, {"matmul": 0.3, "attention": 0.25}, "NVIDIA GeForce RTX 4090")
    assert path == tmp_path / "calibration.json" and json.loads(path.read_text())["RTX 4090"]["device"]
    eff, measured = calibration.efficiencies(RTX4090)
    assert measured and eff["matmul"] == 0.3 and eff["attention"] == 0.25 and eff["conv"] == calibration.ASSUMED["conv"]
    assert calibration.efficiencies(card_by_name("RTX 3090")) == (calibration.ASSUMED, False)   # per card
    calibrated = estimate_run(folder, profile, PRESET, RTX4090)
    load = assumed.work["loaded_bytes"] / 3e9
    assert calibrated.calibrated and (calibrated.seconds["denoise"] - load) == pytest.approx(
        2 * (assumed.seconds["denoise"] - load))
    assert calibrated.seconds["decode"] == assumed.seconds["decode"]


def test_calibration_refuses_nonsense_and_survives_a_damaged_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    for bad in ({"matmul": 0.0}, {"matmul": 7.0}, {"speed": 0.5}, {"matmul": True}):
        with pytest.raises(ValueError, match="out of range or unknown"):
            calibration.store(RTX4090, bad, "x")
    (tmp_path / "calibration.json").write_text("{not json")
    assert calibration.efficiencies(RTX4090) == (calibration.ASSUMED, False)
    (tmp_path / "calibration.json").write_text(json.dumps({"RTX 4090": {"efficiency": {"matmul": "fast"}}}))
    assert calibration.efficiencies(RTX4090) == (calibration.ASSUMED, False)
    assert calibration.efficiency(10.0, 20.0) == 0.5
    with pytest.raises(ValueError):
        calibration.efficiency(1.0, 0.0)


def test_the_dry_run_gives_estimate_seconds(capsys, demo_env):
    rc, out, err = run_cli(capsys, "--demo", "--profile", "8gb", "--prompt", "an estimate", "--dry-run", "--json",
                           "--card", "RTX 4090")
    got = json.loads(out)
    assert rc == 0, err
    seconds = got["estimate_seconds"]
    assert set(seconds) == {"text", "denoise", "decode", "total"}
    assert seconds["total"] == pytest.approx(sum(seconds[k] for k in ("text", "denoise", "decode")), abs=0.2)
    assert got["estimate"]["card"] == "RTX 4090" and got["estimate"]["calibrated"] is False
    rc, text, err = run_cli(capsys, "--demo", "--profile", "8gb", "--prompt", "an estimate", "--dry-run",
                            "--card", "RTX 4090")
    assert "estimate: about" in text and "an estimate, from peak throughput x assumed efficiencies" in text


def test_the_turbo_release_is_estimated_at_its_steps(capsys, demo_env):
    """stepfun-ai/stepvideo-t2v-turbo: the release's shapes with the turbo checkpoint's 15 steps."""
    rc, out, err = run_cli(capsys, "--model-dir", "stepfun-ai/stepvideo-t2v-turbo", "--prompt", "x", "--dry-run",
                           "--json", "--frames", "17", "--height", "272", "--width", "496", "--ram-gib", "64",
                           "--card", "RTX 4090")
    assert rc == 0, err
    assert json.loads(out)["estimate"]["preset"] == "17x272x496@15"


def test_the_sidecar_has_the_estimate_beside_the_timings(folder, monkeypatch, fixed_work):
    pipe = SimpleNamespace(folder=folder, profile=load_profile("24gb"), options=None)
    monkeypatch.setattr(outputs, "this_card", lambda: (RTX4090, (8, 9)))
    got = outputs.run_estimate(pipe, PRESET)
    assert set(got["estimate_s"]) == {"text", "denoise", "decode", "total"} and got["estimate"]["card"] == "RTX 4090"
    from lowvram_stepvideo.engines.parallel import layout_for
    shared = outputs.run_estimate(pipe, PRESET, layout_for("cfg", 2))        # one process's share of a CFG split
    assert shared["estimate_s"]["denoise"] < got["estimate_s"]["denoise"]
    assert "2 processes: CFG x2, one RTX 4090 each" in shared["estimate"]["notes"]
    monkeypatch.setattr(outputs, "this_card", lambda: (None, None))     # the CPU, or a card not in the table
    assert outputs.run_estimate(pipe, PRESET) == {"estimate_s": None, "estimate": None}


@pytest.mark.slow
def test_a_demo_run_records_timings_and_estimate(capsys, demo_env, tmp_path):
    out = tmp_path / "cat.mp4"
    rc, _, err = run_cli(capsys, "--demo", "--prompt", "a cat", "--output", out, "--steps", "2")
    meta = json.loads(out.with_name("cat.mp4.json").read_text())
    assert rc == 0, err
    assert set(meta["timings_s"]) >= {"text", "denoise", "decode"}
    assert "estimate_s" in meta and meta["estimate_s"] is None      # the CPU: no card to estimate for


def _speed_gpu():
    """bench/speed_gpu.py as a module (it puts bench/ on sys.path itself, for its stream_gpu import)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_speed_gpu", root / "bench" / "speed_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibrate_stores_what_it_measured(tmp_path, monkeypatch, folder, fixed_work):
    """bench/speed_gpu.py --calibrate, its measurements replaced (no GPU here): each kind's efficiency is the
    estimate's seconds at peak over the seconds measured, stored for the card torch reports, used from then on."""
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_CACHE", str(tmp_path))
    bench = _speed_gpu()
    peak = RTX4090.tflops("bf16") * 1e12
    monkeypatch.setattr(bench.torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * 2**30))
    monkeypatch.setattr(bench, "_matmul", lambda device, repeats: (peak, 2.0))            # 50% of peak
    monkeypatch.setattr(bench, "_attention", lambda kernel, device, repeats: (peak, 4.0))  # 25%
    monkeypatch.setattr(bench, "_vae", lambda device, repeats: (peak, 5.0))               # 20%
    monkeypatch.setattr(bench, "_pinned_copy", lambda device, repeats: (RTX4090.host_link_gbs * 1e9, 1.25))
    monkeypatch.setattr(bench, "_device_copy", lambda device, repeats: (RTX4090.memory_gbs * 1e9, 2.0))
    found = bench.calibrate(bench.torch.device("cpu"), 1)
    assert found["card"] == "RTX 4090" and found["attention_kernel"] == "sdpa"
    assert found["efficiency"] == pytest.approx({"matmul": 0.5, "attention": 0.25, "conv": 0.2, "host_link": 0.8,
                                                 "memory": 0.5})
    est = estimate_run(folder, load_profile("24gb"), PRESET, RTX4090)
    assert est.calibrated and est.efficiency["conv"] == pytest.approx(0.2)
    assert est.seconds["decode"] == pytest.approx(3e14 / (0.2 * peak))


def test_calibrate_refuses_without_cuda(capsys):
    bench = _speed_gpu()
    if bench.torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert bench.main(["--calibrate"]) == 2
    assert "--calibrate measures a CUDA card" in capsys.readouterr().err
