"""Kernels probed before they are trusted (engines/probes.py), refused before any weight is read when asked for
explicitly, and replaced by SDPA at the call site where one fails mid-run (attention_paths.Guarded): on the CPU,
with fake backends put in attention.SOURCES on a simulated card."""
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from cli_support import loads_of, read_sidecar, run_cli
from lowvram_stepvideo.engines import attention, fast_matmul, probes
from lowvram_stepvideo.engines.attention_paths import Guarded
from lowvram_stepvideo.engines.levers import DiTLevers, SpeedOptions
from lowvram_stepvideo.engines.target import Target
from lowvram_stepvideo.errors import StepVideoError
from lowvram_stepvideo.face.api import StepVideoPipeline
from lowvram_stepvideo.files.caches import CACHE_ENV
from lowvram_stepvideo.models.layers import sdpa
from lowvram_stepvideo.pipeline import machine
from lowvram_stepvideo.profiles import load_profile, with_overrides
from lowvram_stepvideo.run import preflight

RTX_4090 = Target((8, 9), "NVIDIA GeForce RTX 4090")
H100 = Target((9, 0), "NVIDIA H100 80GB HBM3")
T4 = Target((7, 5), "Tesla T4")
NOT_AVAILABLE = "SM89 kernel is not available"


class FakeKernel(attention.KernelSource):
    """An attention kernel on the CPU: "exact" computes SDPA (bit for bit), "raises" fails every call with
    `message`, "garbage" returns the right shape and dtype but wrong values, "missing" does not import. With
    `fail_from`, calls from that one on (counted from 1, the probe's included) raise `message`."""
    needs_cuda = False

    def __init__(self, behaviour: str = "exact", fail_from: int | None = None, message: str = NOT_AVAILABLE):
        super().__init__([], ("fake",))
        self.behaviour, self.fail_from, self.message = behaviour, fail_from, message
        self.calls, self.layouts = 0, []

    @property
    def function(self):
        return None if self.behaviour == "missing" else self._run

    def version(self) -> str:
        return f"fake {self.behaviour} {self.fail_from}"

    def _run(self, q, k, v, **kwargs):
        self.calls += 1
        self.layouts.append((q.shape[-1], q.dtype, q.is_contiguous(), v.is_contiguous()))
        if self.behaviour == "raises" or (self.fail_from is not None and self.calls >= self.fail_from):
            raise RuntimeError(f"{self.message}\nsecond line of the traceback text")
        out = sdpa(q, k, v)
        return out.flip(1) if self.behaviour == "garbage" else out


@pytest.fixture(autouse=True)
def fresh_probe_cache(monkeypatch, tmp_path):
    """Each test probes into its own cache file (the in-process memo is keyed by the file)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def fakes(monkeypatch, **kernels: FakeKernel) -> None:
    """Every optional kernel absent, except the fakes given (name -> FakeKernel)."""
    for name in attention.SOURCES:
        monkeypatch.setitem(attention.SOURCES, name, kernels.get(name, FakeKernel("missing")))


# ---- the probe -------------------------------------------------------------------------------------------------

def test_probe_runs_the_kernel_as_the_dit_lays_out_its_tensors(monkeypatch):
    fake = FakeKernel()
    fakes(monkeypatch, sage=fake, flash2=FakeKernel("raises"), flash3=FakeKernel("garbage"))
    found = probes.probe_attention("sage", "cpu", torch.bfloat16)
    assert found.ok and found.error < 0.02 and found.describe().startswith("sage: passed (relative error")
    # self-attention: strided q and v of one qkv buffer; sage's masked cross-attention call runs SDPA (exact)
    assert fake.layouts == [(128, torch.bfloat16, False, False)]
    failed = probes.probe_attention("flash2", "cpu", torch.bfloat16)
    assert not failed.ok and failed.reason == NOT_AVAILABLE and failed.error is None
    garbage = probes.probe_attention("flash3", "cpu", torch.float32, head_dim=64)
    assert not garbage.ok and "wrong result (relative error" in garbage.reason and garbage.error > 0.5
    fakes(monkeypatch)
    missing = probes.probe_attention("sage", "cpu", torch.bfloat16)
    assert not missing.ok and missing.reason == "not importable (pip install sageattention)"


def test_probe_results_are_kept_per_device_and_build(monkeypatch, tmp_path):
    fake = FakeKernel()
    fakes(monkeypatch, flash2=fake)
    first = probes.probe_attention("flash2", "cpu", torch.float32)
    assert fake.calls == 3                               # self-attention, then the masked call once per sample
    assert probes.probe_attention("flash2", "cpu", torch.float32) == first and fake.calls == 3
    saved = json.loads(probes.probes_file().read_text())
    (key, entry), = saved.items()
    assert key.startswith(f"cpu | torch {torch.__version__} | flash2 | fake exact None | torch.float32")
    assert entry["probe"]["ok"] is True
    probes._MEMO.clear()                                # another process: read from the file, not rerun
    assert probes.probe_attention("flash2", "cpu", torch.float32) == first and fake.calls == 3
    rebuilt = FakeKernel("raises")                       # another build of the package: probed again
    fakes(monkeypatch, flash2=rebuilt)
    assert not probes.probe_attention("flash2", "cpu", torch.float32).ok and rebuilt.calls == 1
    probes.probes_file().write_text("{ damaged")          # a damaged file: probed again, rewritten
    probes._MEMO.clear()
    assert not probes.probe_attention("flash2", "cpu", torch.float32).ok and rebuilt.calls == 2
    assert len(json.loads(probes.probes_file().read_text())) == 1


def test_the_fast_matmul_probe_checks_the_result(monkeypatch):
    assert probes.probe_matmul("int8", "cpu", torch.float32).ok
    monkeypatch.setitem(fast_matmul.KERNELS, "fp8", lambda x, codes, scale, bias: x[..., :codes.shape[0]] * 0)
    found = probes.probe_matmul("fp8", "cpu", torch.bfloat16)
    assert not found.ok and found.reason.startswith("wrong result (relative error 1 against weight-only")


# ---- choosing --------------------------------------------------------------------------------------------------

def test_auto_takes_the_first_kernel_of_the_cards_order_that_passes(monkeypatch):
    auto = load_profile("24gb")
    fakes(monkeypatch, sage=FakeKernel("raises"), flash2=FakeKernel(), flash3=FakeKernel())
    run = probes.choose_run_attention(auto, RTX_4090, "cpu")       # GeForce: sage first
    assert (run.kernel, run.precision) == ("flash2", None)
    assert f"sage failed its probe ({NOT_AVAILABLE})" in run.why and [p.kernel for p in run.failed] == ["sage"]
    assert probes.choose_run_attention(auto, H100, "cpu").kernel == "flash3"
    fakes(monkeypatch, sage=FakeKernel("raises"), flash2=FakeKernel("garbage"))
    run = probes.choose_run_attention(auto, RTX_4090, "cpu")
    assert run.kernel == "sdpa" and [p.kernel for p in run.failed] == ["sage", "flash2"]
    assert probes.choose_run_attention(auto, Target(None, "cpu"), "cpu").kernel == "sdpa"


def _timed_as(monkeypatch, milliseconds: dict[str, float], fails_when_timed: str | None = None) -> list[str]:
    """probes.timed_call as on a CUDA card where kernel k takes milliseconds[k]: it runs the kernel once on the
    probe's inputs (the fakes count the call) and returns that time; `fails_when_timed` raises there."""
    timed = []

    def timed_call(attend, device, dtype, head_dim):
        inner = getattr(attend, "inner", attend)
        kernel = inner.keywords["backend"] if isinstance(inner, functools.partial) else "sdpa"
        timed.append(kernel)
        if kernel == fails_when_timed:
            raise RuntimeError("invalid configuration argument\nmore")
        attend(*probes.dit_like_inputs(device, dtype, head_dim)["self"])
        return milliseconds[kernel] / 1e3
    monkeypatch.setattr(probes, "timed_call", timed_call)
    return timed


def test_where_kernels_are_timed_auto_takes_the_fastest_that_passed(monkeypatch):
    """On a CUDA card every kernel of the order is probed and timed, SDPA too: the fastest passing one runs, not
    the first of the table's order; one that fails its probe or its timed call is never taken however fast."""
    auto = load_profile("24gb")
    fakes(monkeypatch, sage=FakeKernel(), flash2=FakeKernel())
    timed = _timed_as(monkeypatch, {"sage": 5.0, "flash2": 3.0, "sdpa": 4.0})
    run = probes.choose_run_attention(auto, RTX_4090, "cpu")        # GeForce: sage first in the table
    assert run.kernel == "flash2" and timed == ["sage", "flash2", "sdpa"]
    assert run.why.endswith("fastest measured here: sage 5 ms, flash2 3 ms, sdpa 4 ms")
    described = probes.probe_attention("flash2", "cpu", torch.bfloat16).describe()
    assert described.startswith("flash2: passed (relative error ") and described.endswith(", 3 ms)")
    fakes(monkeypatch, sage=FakeKernel(), flash2=FakeKernel("raises"), flash3=FakeKernel("missing"))
    monkeypatch.setattr(probes, "_MEMO", {})
    monkeypatch.setenv(CACHE_ENV, str(probes.probes_file().parent.parent / "other"))
    _timed_as(monkeypatch, {"sage": 5.0, "flash2": 0.1, "sdpa": 4.0})
    run = probes.choose_run_attention(auto, RTX_4090, "cpu")
    assert run.kernel == "sdpa" and [p.kernel for p in run.failed] == ["flash2"]
    monkeypatch.setenv(CACHE_ENV, str(probes.probes_file().parent.parent / "third"))
    fakes(monkeypatch, sage=FakeKernel(), flash2=FakeKernel())
    _timed_as(monkeypatch, {"sage": 1.0, "flash2": 3.0, "sdpa": 4.0}, fails_when_timed="sage")
    run = probes.choose_run_attention(auto, RTX_4090, "cpu")
    assert run.kernel == "flash2" and run.failed[0].reason == "failed at 4096 tokens: invalid configuration argument"


def test_timing_runs_on_cuda_only_and_an_explicit_kernel_is_not_raced(monkeypatch):
    assert probes.timed_call(sdpa, "cpu", torch.float32, 128) is None
    fakes(monkeypatch, sage=FakeKernel(), flash2=FakeKernel())
    timed = _timed_as(monkeypatch, {"sage": 5.0, "flash2": 3.0, "sdpa": 1.0})
    run = probes.choose_run_attention(with_overrides(load_profile("24gb"), attention="sage"), RTX_4090, "cpu")
    assert run.kernel == "sage" and timed == ["sage"]


def test_an_explicit_kernel_that_fails_is_refused_naming_what_works(monkeypatch):
    sage = with_overrides(load_profile("24gb"), attention="sage")
    fakes(monkeypatch, sage=FakeKernel("raises"), flash2=FakeKernel())
    problem = probes.explicit_problem(sage, "int8", RTX_4090, "cpu")
    assert problem == (f"--attention sage does not work on NVIDIA GeForce RTX 4090 (compute capability 8.9) (sage: "
                       f"{NOT_AVAILABLE}); what works here: flash, sdpa (--attention auto takes the fastest that "
                       "works)")
    with pytest.raises(probes.KernelRefused):
        probes.choose_run_attention(sage, RTX_4090, "cpu")
    fakes(monkeypatch, flash2=FakeKernel())
    assert "(sage: not importable (pip install sageattention)); what works here: flash, sdpa" in \
        probes.explicit_problem(sage, "int8", RTX_4090, "cpu")
    flash = with_overrides(sage, attention="flash")
    assert probes.explicit_problem(flash, "int8", RTX_4090, "cpu") is None
    fakes(monkeypatch, flash3=FakeKernel("raises"), flash2=FakeKernel())     # Hopper: flash-attn 3, else 2
    assert probes.choose_run_attention(flash, H100, "cpu").kernel == "flash2"
    assert probes.explicit_problem(with_overrides(sage, attention="sdpa"), "int8", T4, "cpu") is None


def test_an_explicit_fast_matmul_that_fails_is_refused(monkeypatch):
    fast = with_overrides(load_profile("24gb"), matmul="fast", attention="sdpa")

    def broken(*args):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
    monkeypatch.setitem(fast_matmul.KERNELS, "int8", broken)
    rtx_3090 = Target((8, 6), "NVIDIA GeForce RTX 3090")
    assert probes.explicit_problem(fast, "int8", rtx_3090, "cpu") == (
        "--matmul fast: the int8 x int8 kernel failed its probe on NVIDIA GeForce RTX 3090: "
        "CUBLAS_STATUS_NOT_SUPPORTED; use --matmul weight-only")
    assert probes.explicit_problem(fast, "int8", T4, "cpu") is None      # no int8 tensor cores: weight-only, said


@pytest.fixture
def simulated_gpu(monkeypatch):
    """A CUDA profile accepted on this CPU machine: 24 GiB reported, its kernels probed on the CPU as an RTX 4090."""
    monkeypatch.setattr(preflight, "detect_vram_bytes", lambda: 24 * 2**30)
    monkeypatch.setattr(preflight, "kernel_target", lambda profile, par=None: (RTX_4090, torch.device("cpu")))


@pytest.mark.usefixtures("demo_env", "one_torch_thread", "simulated_gpu")
def test_the_cli_refuses_a_failing_explicit_kernel_before_reading_weights(monkeypatch, capsys, tmp_path):
    fakes(monkeypatch, sage=FakeKernel("raises"))
    loaded = loads_of(monkeypatch)
    rc, out, err = run_cli(capsys, "--demo", "--profile", "24gb", "--attention", "sage", "--prompt", "a fox",
                           "--output", tmp_path / "fox.mp4")
    assert rc == 2 and loaded == [] and not (tmp_path / "fox.mp4").exists()
    line, = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: --attention sage does not work on NVIDIA GeForce RTX 4090") and \
        line.endswith("what works here: sdpa (--attention auto takes the fastest that works)")


@pytest.mark.usefixtures("simulated_gpu")
def test_auto_probes_and_times_its_kernels_in_the_preflight(monkeypatch):
    """A card seen for the first time: the preflight (run before any weight is read, as the refusal tests above
    show) probes and times auto's kernels, so their tensors (the timed call's 151 MB on CUDA) come and go before the
    weights take device memory; the run's own choice then reads the cache and runs nothing."""
    fakes(monkeypatch, sage=FakeKernel(), flash2=FakeKernel())
    timed = _timed_as(monkeypatch, {"sage": 5.0, "flash2": 3.0, "sdpa": 4.0})
    preflight.check_kernels(load_profile("24gb"), "int8")
    assert timed == ["sage", "flash2", "sdpa"]
    assert probes.choose_run_attention(load_profile("24gb"), RTX_4090, "cpu").kernel == "flash2"
    assert timed == ["sage", "flash2", "sdpa"]


@pytest.mark.usefixtures("demo_env", "one_torch_thread", "simulated_gpu")
def test_the_api_raises_the_same_one_line_error(monkeypatch):
    fakes(monkeypatch, sage=FakeKernel("raises"))
    pipe = StepVideoPipeline(demo=True, profile="24gb", attention="sage", log=lambda msg: None)
    loaded = loads_of(monkeypatch)
    with pytest.raises(StepVideoError, match="^--attention sage does not work on .*fastest that works\\)$") as e:
        pipe("a fox", num_frames=17, height=16, width=16, num_inference_steps=1)
    assert "\n" not in str(e.value) and loaded == []


# ---- mid-run fallback ------------------------------------------------------------------------------------------

def test_a_guarded_kernel_reruns_the_failed_call_and_stays_on_the_fallback():
    fake, said = FakeKernel(fail_from=3), []
    guarded = Guarded(lambda q, k, v, mask=None: fake(q, k, v), sdpa, "blocks.0.attn1", lambda *a: said.append(a))
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    for _ in range(4):
        torch.testing.assert_close(guarded(q, k, v), sdpa(q, k, v), rtol=0, atol=0)
    assert fake.calls == 3 and said == [("blocks.0.attn1", NOT_AVAILABLE)] and guarded.failed == NOT_AVAILABLE

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    oom = Guarded(out_of_memory, sdpa, "blocks.0.attn1", lambda *a: pytest.fail("OOM is not a kernel failure"))
    with pytest.raises(torch.OutOfMemoryError):
        oom(q, k, v)
    assert oom.failed is None


@pytest.mark.usefixtures("demo_env", "one_torch_thread")
def test_a_kernel_failing_mid_run_loses_no_step(monkeypatch, capsys, tmp_path):
    """A demo run on a simulated RTX 4090 whose (fake) SageAttention computes exactly as SDPA, passes its probe and
    then fails from its 5th call on (the probe makes one: its masked call runs SDPA; the run's 4th, in the second
    forward of the first step): the same latents as an all-SDPA run, one warning line, both self-attention sites
    switched (in the sidecar; each failed once)."""
    base = ["--demo", "--prompt", "a lighthouse", "--frames", "17", "--height", "16", "--width", "16",
            "--steps", "2", "--no-text-cache"]
    rc, _, err = run_cli(capsys, *base, "--attention", "sdpa", "--output", tmp_path / "sdpa.mp4",
                         "--save-latents", tmp_path / "sdpa.safetensors")
    assert rc == 0, err
    fake = FakeKernel(fail_from=5)
    fakes(monkeypatch, sage=fake)
    monkeypatch.setattr(machine, "current_target", lambda device=None: RTX_4090)
    rc, _, err = run_cli(capsys, *base, "--attention", "auto", "--output", tmp_path / "sage.mp4",
                         "--save-latents", tmp_path / "sage.safetensors")
    assert rc == 0, err
    assert fake.calls == 6 and "speed: attention sage (GeForce" in err
    warnings = [ln for ln in err.splitlines() if "failed in" in ln]
    assert warnings == [f"warning: attention kernel sage failed in transformer_blocks.1.attn1 ({NOT_AVAILABLE}); "
                        "that call was rerun on sdpa and the call site stays on sdpa: no step is lost"]
    speed = read_sidecar(tmp_path / "sage.mp4")["speed"]
    assert speed["attention"] == "sage" and set(speed["attention_fallbacks"]) == {
        "transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    assert torch.equal(load_file(str(tmp_path / "sage.safetensors"))["latents"],
                       load_file(str(tmp_path / "sdpa.safetensors"))["latents"])


def test_the_levers_run_turing_bf16_attention_in_float16_and_fall_back_to_exact(monkeypatch, caplog):
    """sm75 in bf16: SDPA on float16 copies (probed first); if that probe fails, the exact float32 path."""
    from conftest import tiny_dit
    dit = tiny_dit(1, 0.05).to(torch.bfloat16)
    profile = with_overrides(load_profile("cpu"), compute_dtype="bfloat16", attention="auto")
    levers = DiTLevers(dit, profile, SpeedOptions(), torch.device("cpu"), T4).attach()
    kernels = {m.attend for m in dit.modules() if hasattr(m, "attend")}
    assert kernels == {attention.HalfPrecision(sdpa)} and levers.info["attention_precision"] == "float16"
    assert "attention sdpa in float16" in levers.summary()
    levers.detach()
    failing = probes.Probe("sdpa (float16)", False, "no kernel")
    monkeypatch.setattr(probes, "probe_attention", lambda *a, **kw: failing)
    levers = DiTLevers(dit, profile, SpeedOptions(), torch.device("cpu"), T4).attach()
    assert {m.attend for m in dit.modules() if hasattr(m, "attend")} == {attention.exact_attention}
    assert levers.info["attention_precision"] == "float32"
    levers.detach()


# ---- bench/probes_gpu.py and the real card ----------------------------------------------------------------------

def _bench_probes():
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_probes_gpu", ROOT / "bench" / "probes_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_probe_report_checks_the_card_and_marks_what_the_table_gets_wrong(monkeypatch):
    """The GPU check's report, run on the CPU for a simulated RTX 4090: sage (listed for sm89) fails, flash-attn 3
    (not listed) passes: both marked; a name not in the card table fails the card check."""
    bench = _bench_probes()
    fakes(monkeypatch, sage=FakeKernel("raises"), flash2=FakeKernel(), flash3=FakeKernel())
    same, text = bench.report("cpu", "NVIDIA GeForce RTX 4090", 24 * 2**30, (8, 9))
    assert same and text.startswith("card: NVIDIA GeForce RTX 4090 (24.0 GiB, compute capability 8.9) is the "
                                    "table's RTX 4090 (24 GB, 8.9)")
    rows = text.splitlines()
    assert f"| torch.bfloat16 | sage | lists it | failed (table?) |  |  | {NOT_AVAILABLE} |" in rows
    assert any(r.startswith("| torch.bfloat16 | flash3 | does not list it | passed (table?) |") for r in rows)
    assert any(r.startswith("| torch.bfloat16 | sdpa (float16) |  | passed |") for r in rows)
    assert any(r.startswith("| torch.bfloat16 | int8 x int8 |  | passed |") for r in rows)
    assert rows[-1].startswith("a run of the 24gb profile (attention auto) attaches: flash2 (GeForce")
    same, text = bench.report("cpu", "NVIDIA GeForce GTX 1080", 8 * 2**30, (6, 1))
    assert not same and "is NOT in the card table" in text


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_on_the_card_auto_attaches_a_kernel_that_passed_and_float16_paths_work():
    from lowvram_stepvideo.engines.target import current_target
    card = current_target("cuda")
    assert probes.driver_version() != "unknown"      # the cache key names the driver (NVML or the CUDA driver API)
    run = probes.choose_run_attention(load_profile("24gb"), card, "cuda")
    assert run.kernel == "sdpa" or probes.probe_attention(run.kernel, "cuda", torch.bfloat16, 128, run.precision).ok
    timed = probes.probe_attention("sdpa", "cuda", torch.bfloat16, 128)
    assert timed.ok and 0 < timed.seconds < 1, timed                 # one self-attention call of probes.TIMED
    assert "fastest measured here" in run.why or probes.candidates("auto", card) == ["sdpa"], run.why
    for precision in ("float16", "float32"):         # Turing's float16 copies, and the exact path, on this card
        found = probes.probe_attention("sdpa", "cuda", torch.bfloat16, 128, precision)
        assert found.ok and found.error < 0.01, found


@pytest.mark.gpu
@gpu
def test_on_the_card_a_large_v_runs_in_float16_scaled():
    from lowvram_stepvideo.engines.attention_paths import HalfPrecision
    q, k, v = (torch.randn(1, 512, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    big = v * 1e5                                    # float16's largest finite value is 65504
    out = HalfPrecision(sdpa)(q, k, big)
    assert out.isfinite().all() and out.dtype == torch.bfloat16
    ref = sdpa(q.double(), k.double(), big.double())
    assert float((out.double() - ref).norm() / ref.norm()) < 2 ** -8


def test_in_a_parallel_run_every_rank_stops_when_one_cannot_run_its_kernels(monkeypatch):
    """check_kernels on each rank: the rank whose card refuses says why, the others stop with it (all_agree)."""
    class Rank:
        device = torch.device("cpu")

        def __init__(self, others_ok: bool):
            self.others_ok, self.asked = others_ok, []

        def all_agree(self, ok: bool) -> bool:
            self.asked.append(ok)
            return ok and self.others_ok
    sage = with_overrides(load_profile("24gb"), attention="sage")
    monkeypatch.setattr(preflight, "current_target", lambda device: RTX_4090)
    fakes(monkeypatch, sage=FakeKernel())
    fine = Rank(others_ok=True)
    preflight.check_kernels(sage, "int8", fine)
    assert fine.asked == [True]
    waiting = Rank(others_ok=False)
    with pytest.raises(StepVideoError, match="^another process of this parallel run cannot run its kernels"):
        preflight.check_kernels(sage, "int8", waiting)
    fakes(monkeypatch, sage=FakeKernel("raises"))
    failing = Rank(others_ok=True)
    with pytest.raises(StepVideoError, match=f"^--attention sage does not work on .*sage: {NOT_AVAILABLE}"):
        preflight.check_kernels(sage, "int8", failing)
    assert failing.asked == [False]
    preflight.check_kernels(load_profile("cpu"), "int8", Rank(others_ok=False))   # the CPU: nothing to probe
