"""Kernels are run once on the device before a run trusts them: an attention kernel or a fast matmul that imports
can still fail on the card (a wheel built for another architecture: "Unsupported CUDA architecture", "SM8x kernel
is not available"), and then it would fail at its first call, after the text phase, in the middle of denoising.

`probe_attention(kernel, device, dtype, head_dim, precision)` runs the kernel as the run would (attention.run_function:
at the card's precision) on small q, k, v laid out as the DiT gives them: self-attention's q, k and v are strided
views of one (B, S, H, 3 x head_dim) buffer, q and k RMS-normed; cross-attention's q and k are contiguous, v a view,
with a key mask. It passes when both calls return the input's shape and dtype within TOLERANCE (relative error)
of float32 SDPA on the same inputs: a kernel that raises fails, and so does one that runs and returns something
else. On a CUDA device a kernel that passed is then timed on one self-attention call of TIMED's size (the release
DiT's 48 heads over 4096 tokens; the median of 3 calls after a warm-up): a kernel that fails there fails its probe.
`probe_matmul` runs fast_matmul.probe (the fast matmul against the weight-only one).

A run attaches what `choose_run_attention` says: with "auto", the fastest kernel measured among those of the card
table's order that import and pass their probes, SDPA included (where nothing was timed, on the CPU, the first of
that order that passes); an explicit kernel that fails is refused before any weight is read
(`explicit_problem`, from the run's preflight), naming the reason and what passes instead. SDPA is the fallback
and is not probed, except on float16 copies (attention.attention_precision): if that fails, the exact float32 path
runs instead.

Results are kept in cache_home()/probes.json (and in the process) under the device (name, compute capability,
driver, CUDA and torch versions), the kernel and its build (its package's version), the dtype and the head size: a
kernel is probed once per machine setup. A kernel that does not import is not probed (and not kept).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import attention, fast_matmul
from .attention_paths import first_line
from .cards import attention_order
from .target import Target
from ..files.caches import cache_home, read_cache_json
from ..files.fsutil import atomic_path
from ..models.layers import sdpa
from ..profiles import Profile

TOLERANCE = 0.1       # relative error against float32 SDPA: SageAttention's int8 QK stays well under, a wrong
                      # layout, scale or mask does not
BATCH, TOKENS, KEYS, HEADS = 2, 256, 80, 2
TIMED = (1, 4096, 48)   # the timed self-attention call on CUDA: batch, tokens, heads (151 MB of q, k, v in bf16)
FILE_NAME = "probes.json"
_MEMO: dict[tuple[str, str], "Probe"] = {}


@dataclass(frozen=True)
class Probe:
    """One kernel's probe on one device: `ok`, else `reason`; `error`: the relative error it reached, when it ran;
    `seconds`: its timed call (TIMED), on CUDA when it passed."""
    kernel: str
    ok: bool
    reason: str = ""
    error: float | None = None
    seconds: float | None = None

    def describe(self) -> str:
        measured = ([] if self.error is None else [f"relative error {self.error:.2g}"]) + \
            ([] if self.seconds is None else [f"{self.seconds * 1e3:.3g} ms"])
        detail = f" ({', '.join(measured)})" if measured else ""
        return f"{self.kernel}: {'passed' + detail if self.ok else 'failed: ' + self.reason}"


def label(kernel: str, precision: str | None = None) -> str:
    """The name a probe and the log give `kernel` at `precision`: "sdpa", "sdpa (float16)"."""
    return kernel if precision is None else f"{kernel} ({precision})"


def device_key(device) -> str:
    """What identifies the device for the cache: name, compute capability, driver, CUDA and torch versions."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} | torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} | compute capability {props.major}.{props.minor} | driver {driver_version()} | "
            f"cuda {torch.version.cuda} | torch {torch.__version__}")


@functools.cache
def driver_version() -> str:
    """The NVIDIA driver's version as NVML reports it ("550.54.15"), else the CUDA version the driver supports
    ("cuda 12.4"), else "unknown" (torch does not expose either)."""
    for name in ("libnvidia-ml.so.1", "nvml.dll"):
        with contextlib.suppress(OSError, AttributeError):
            nvml, text = ctypes.CDLL(name), ctypes.create_string_buffer(96)
            if nvml.nvmlInit_v2() == 0 and nvml.nvmlSystemGetDriverVersion(text, 96) == 0:
                return text.value.decode(errors="replace")
    for name in ("libcuda.so.1", "nvcuda.dll"):
        with contextlib.suppress(OSError, AttributeError):
            version = ctypes.c_int()
            if ctypes.CDLL(name).cuDriverGetVersion(ctypes.byref(version)) == 0:
                return f"cuda {version.value // 1000}.{version.value % 1000 // 10}"
    return "unknown"


def probe_attention(kernel: str, device, dtype: torch.dtype, head_dim: int = 128,
                    precision: str | None = None) -> Probe:
    """Probe attention `kernel` (attention.KERNELS) at `precision` on `device` for a DiT computing in `dtype`."""
    name = label(kernel, precision)
    if not attention.is_available(kernel):
        family = "flash" if kernel.startswith("flash") else kernel
        return Probe(name, False, f"not importable ({attention.INSTALL_HINT.get(family, 'not installed')})")
    key = f"{device_key(device)} | {name} | {attention.kernel_version(kernel)} | {dtype} | head_dim {head_dim}"
    return _cached(key, lambda: _run_attention(name, attention.run_function(kernel, precision), device, dtype,
                                               head_dim))


def probe_matmul(fmt: str, device, dtype: torch.dtype) -> Probe:
    """Probe the fast `fmt` matmul (fast_matmul.KERNEL_TABLE) on `device` with activations in `dtype`."""
    name = f"{fmt} x {fmt}"
    key = f"{device_key(device)} | matmul {name} | torch {torch.__version__} | {dtype}"

    def run() -> Probe:
        failed = fast_matmul.probe(fmt, device, dtype)
        return Probe(name, failed is None, failed or "")
    return _cached(key, run)


@dataclass
class RunAttention:
    """What a run attaches: `kernel` (attention.KERNELS) at `precision` (attention.PRECISIONS), SDPA at
    `fallback_precision` as the fallback of a call site whose kernel fails mid-run; why, and the probes of the
    kernels passed over."""
    kernel: str
    precision: str | None
    fallback_precision: str | None
    why: str
    failed: list[Probe]


class KernelRefused(ValueError):
    """An explicit attention kernel or fast matmul that does not work on this card (the message says why and what
    works instead)."""


def choose_run_attention(profile: Profile, card: Target, device, head_dim: int = 128) -> RunAttention:
    """The attention a run of `profile` attaches on `card`, its tensors on `device` (see the module docstring).
    KernelRefused: an explicit kernel that does not import or fails its probe."""
    dtype = profile.torch_dtype
    precision = attention.attention_precision(card.capability, dtype)
    sdpa_precision = precision
    if precision is not None and not probe_attention("sdpa", device, dtype, head_dim, precision).ok:
        sdpa_precision = "float32"            # float16 SDPA fails here: the exact path
    auto = profile.attention == "auto"
    why = attention.choose_auto(card, attention.is_available)[1] if auto else "as configured"
    failed, passed = [], []
    for kernel in candidates(profile.attention, card):
        if kernel == "sdpa":
            break
        found = probe_attention(kernel, device, dtype, head_dim, precision)
        (passed if found.ok else failed).append((kernel, found))
        if found.ok and not auto:
            break
    failed = [found for _, found in failed]
    if auto and passed and passed[0][1].seconds is not None:   # timed: SDPA competes too
        passed.append(("sdpa", probe_attention("sdpa", device, dtype, head_dim, sdpa_precision)))
        passed = [(k, p) for k, p in passed if p.ok and p.seconds is not None]
        kernel = min(passed, key=lambda kp: kp[1].seconds)[0]
        why += "; fastest measured here: " + ", ".join(f"{k} {p.seconds * 1e3:.3g} ms" for k, p in passed)
        return RunAttention(kernel, sdpa_precision if kernel == "sdpa" else precision, sdpa_precision,
                            _with_failures(why, failed), failed)
    if passed:
        return RunAttention(passed[0][0], precision, sdpa_precision, _with_failures(why, failed), failed)
    if failed and not auto:
        raise KernelRefused(refusal(profile.attention, card, failed, device, dtype, head_dim))
    return RunAttention("sdpa", sdpa_precision, sdpa_precision, _with_failures(why, failed), failed)


def candidates(name: str, card: Target) -> list[str]:
    """The kernels a profile's `attention` value tries on `card`, in turn: auto's order (importable ones, SDPA
    last), "flash": flash-attn 3 (Hopper) then 2, or the one named."""
    if name == "auto":
        order = attention_order(card.capability, card.geforce) if card.cuda else ("sdpa",)
        return [k for k in order if attention.is_available(k)]
    if name == "flash":
        return ["flash3", "flash2"] if card.capability and card.capability[0] == 9 else ["flash2"]
    if name not in attention.BACKENDS:
        attention.check_backend(name)         # a kernel's own name (flash2, ...) is taken; anything else raises
    return [name]


def _with_failures(why: str, failed: list[Probe]) -> str:
    return why + "".join(f"; {p.kernel} failed its probe ({p.reason})" for p in failed)


def refusal(name: str, card: Target, failed: list[Probe], device, dtype: torch.dtype, head_dim: int) -> str:
    """One line: explicit attention `name` fails here (the probes in `failed`), and the kernels that pass."""
    precision = attention.attention_precision(card.capability, dtype)
    tried = {p.kernel for p in failed}
    works = [k for k in candidates("auto", card) if k != "sdpa" and label(k, precision) not in tried
             and probe_attention(k, device, dtype, head_dim, precision).ok]
    works = [("flash" if k.startswith("flash") else k) for k in works] + ["sdpa"]
    where = card.name or device_key(device)
    cap = f" (compute capability {card.capability[0]}.{card.capability[1]})" if card.capability else ""
    reasons = "; ".join(f"{p.kernel}: {p.reason}" for p in failed)
    return (f"--attention {name} does not work on {where}{cap} ({reasons}); what works here: "
            f"{', '.join(dict.fromkeys(works))} (--attention auto takes the fastest that works)")


def explicit_problem(profile: Profile, weight_format: str | None, card: Target, device) -> str | None:
    """Why the explicit kernels of `profile` (an attention other than auto and sdpa, matmul "fast" where the card
    table gives the card the kernel) cannot run on `card`, or None. Probes them on `device`; auto's kernels are
    probed (and timed) here too, so that on a card seen for the first time their tensors come and go before any
    weight takes device memory (the run's choice then reads the cache)."""
    head_dim = 128
    if profile.attention == "auto":
        choose_run_attention(profile, card, device, head_dim)
    elif profile.attention != "sdpa":
        try:
            choose_run_attention(profile, card, device, head_dim)
        except KernelRefused as e:
            return str(e)
    use, _ = fast_matmul.choose_matmul(profile, weight_format, card)
    if use is not None:
        found = probe_matmul(use, device, profile.torch_dtype)
        if not found.ok:
            return (f"--matmul fast: the {found.kernel} kernel failed its probe on {card.name or device_key(device)}: "
                    f"{found.reason}; use --matmul weight-only")
    return None


def dit_like_inputs(device, dtype: torch.dtype, head_dim: int) -> dict[str, tuple]:
    """The probe's two calls: "self" (q, k, v) and "cross" (q, k, v, key mask), laid out as the DiT's."""
    g = torch.Generator().manual_seed(0)

    def normed(x: torch.Tensor) -> torch.Tensor:          # RMS-normed, scores a little sharper than N(0, 1)
        return x.mul_(2.0 * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)))

    qkv = torch.randn(BATCH, TOKENS, HEADS, 3 * head_dim, generator=g)
    for part in (slice(0, head_dim), slice(head_dim, 2 * head_dim)):
        qkv[..., part] = normed(qkv[..., part].clone())
    qkv = qkv.to(device, dtype)
    q, k, v = (qkv[..., i * head_dim:(i + 1) * head_dim] for i in range(3))
    cross_q = normed(torch.randn(BATCH, TOKENS, HEADS, head_dim, generator=g)).to(device, dtype)
    cross_k = normed(torch.randn(BATCH, KEYS, HEADS, head_dim, generator=g)).to(device, dtype)
    kv = torch.randn(BATCH, KEYS, HEADS, 2 * head_dim, generator=g).to(device, dtype)
    mask = torch.arange(KEYS)[None, :] < torch.tensor([[KEYS // 2], [KEYS - 3]])    # (B, Sk): per-sample prefixes
    return {"self": (q, k, v), "cross": (cross_q, cross_k, kv[..., head_dim:], mask.to(device))}


def _run_attention(name: str, attend, device, dtype: torch.dtype, head_dim: int) -> Probe:
    errors = []
    try:
        for args in dit_like_inputs(device, dtype, head_dim).values():
            out = attend(*args)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)    # an asynchronous kernel error surfaces here, not mid-run
            q = args[0]
            if out.shape != q.shape or out.dtype != q.dtype:
                return Probe(name, False, f"returned {tuple(out.shape)} {out.dtype} for {tuple(q.shape)} {q.dtype}")
            want = sdpa(*(t.float() if t.is_floating_point() else t for t in args))
            errors.append(float((out.float() - want).norm() / want.norm()))
    except torch.OutOfMemoryError:
        raise
    except Exception as e:          # what a kernel raises is its own choice (RuntimeError, ValueError, ...)
        return Probe(name, False, first_line(e))
    error = max(errors)
    if not error <= TOLERANCE:       # NaN fails too
        return Probe(name, False, f"wrong result (relative error {error:.3g} against float32 SDPA, more than "
                                  f"{TOLERANCE})", error)
    try:
        seconds = timed_call(attend, device, dtype, head_dim)
    except torch.OutOfMemoryError:
        seconds = None                # a card too full to time it: the table's order decides
    except Exception as e:
        return Probe(name, False, f"failed at {TIMED[1]} tokens: {first_line(e)}", error)
    return Probe(name, True, "", error, seconds)


def timed_call(attend, device, dtype: torch.dtype, head_dim: int) -> float | None:
    """Seconds of one self-attention call of TIMED's size on a CUDA `device` (median of 3 after a warm-up, by
    CUDA events); None on any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    batch, tokens, heads = TIMED
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    attend(q, k, v)
    seconds = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        attend(q, k, v)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return sorted(seconds)[1]


# ---------------------------------------------------------------- the cache

def probes_file() -> Path:
    return cache_home() / FILE_NAME


def _cached(key: str, run) -> Probe:
    memo = (str(probes_file()), key)
    if memo not in _MEMO:
        found = _read().get(key)
        _MEMO[memo] = Probe(**found["probe"]) if _valid(found) else _store(key, run())
    return _MEMO[memo]


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("probe"), dict)
            and set(entry["probe"]) == {"kernel", "ok", "reason", "error", "seconds"})


def _read() -> dict:
    return read_cache_json(probes_file())


def _store(key: str, probe: Probe) -> Probe:
    """Keep `probe` under `key`; a cache that cannot be written is skipped (the probe runs again next time)."""
    data = _read()
    data[key] = {"probe": asdict(probe), "checked": datetime.date.today().isoformat()}
    path = probes_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    except OSError:
        pass
    return probe
