"""Fast low-precision matmuls for quantized linears: profile key `matmul = "weight-only" | "fast"`.

"weight-only" (the default) expands the int8/fp8 weight to the compute dtype and runs an ordinary matmul: the exact
function of the quantized weights. "fast" also quantizes the activations, per token (row) and dynamically:
- int8 folders: x ~ xq * sx (int8, sx = max|row| / 127), y = (xq @ W^T as int32 via torch._int_mm) * sx * sw;
- fp8 folders: x ~ xq * sx (e4m3, sx = max|row| / 448), y = torch._scaled_mm(xq, W^T, sx, sw) in the compute dtype.
Accumulation is exact in int32 (int8) or float32 (fp8); the extra error is the activation rounding (measured in
BENCHMARKS.md on the fixtures). A call the kernel does not take (16 rows or fewer, widths not multiples of 16, a
compute dtype the kernel cannot write) runs the weight-only path.

Which card gets which kernel (`KERNEL_TABLE`, by compute capability; a GPU measurement may move these bounds):
int8 x int8 from 8.0 (Ampere: int8 tensor cores through cuBLASLt), fp8 x fp8 from 8.9 (Ada, Hopper: fp8 tensor
cores). Elsewhere (older cards, the CPU, where these kernels exist but are no faster) "fast" falls back to
weight-only with one line saying why. Both kernels also run on the CPU in torch >= 2.5, which is how the numerics
are tested here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.quant import FORMATS, QuantLinear, dequantize, quantize_rows
from ..profiles import Profile
from .attach import Handle, attaching
from .target import Target

MODES = ("weight-only", "fast")
# weight format -> (lowest compute capability with tensor cores for it, kernel description)
KERNEL_TABLE = {"int8": ((8, 0), "int8 x int8 (torch._int_mm)"), "fp8": ((8, 9), "fp8 x fp8 (torch._scaled_mm)")}
MIN_ROWS = 17          # torch._int_mm on CUDA takes more than 16 rows
WIDTH_MULTIPLE = 16    # _scaled_mm wants K and N multiples of 16 (_int_mm: 8)
FAST_ROWS = 4096       # tokens per kernel call: bounds the int32/float32 (rows, N) temporaries


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """x (..., K) float, codes (N, K) int8, scale (N,) float32 -> (..., N) in x.dtype."""
    def piece(rows: torch.Tensor, out: torch.Tensor) -> None:
        sx = _row_scale(rows, 127.0)
        xq = (rows.float() / sx).round_().clamp_(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, codes.t())                    # (m, N) int32, exact
        del xq
        out.copy_(torch.mul(acc, sx).mul_(scale))             # float32 epilogue, rounded once into out
    return _by_pieces(piece, x, codes.shape[0], bias)


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """x (..., K) float, codes (N, K) e4m3, scale (N,) float32 -> (..., N) in x.dtype."""
    scale_b = scale[None, :].float()

    def piece(rows: torch.Tensor, out: torch.Tensor) -> None:
        sx = _row_scale(rows, 448.0)
        xq = (rows.float() / sx).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        out.copy_(torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=scale_b, out_dtype=out.dtype))
    return _by_pieces(piece, x, codes.shape[0], bias)


def _by_pieces(piece, x: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Run piece(rows (m, K), out (m, N)) over runs of FAST_ROWS rows of x; the last run takes a short remainder
    (every run keeps at least MIN_ROWS rows). Returns (..., N) in x.dtype."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    starts = list(range(0, rows.shape[0], FAST_ROWS))
    if len(starts) > 1 and rows.shape[0] - starts[-1] < MIN_ROWS:
        starts.pop()
    for a, b in zip(starts, starts[1:] + [rows.shape[0]]):
        piece(rows[a:b], out[a:b])
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], n)


def _row_scale(rows: torch.Tensor, qmax: float) -> torch.Tensor:
    """(M, K) -> (M, 1) float32 scale per row; an all-zero row gets 1 (codes 0, no NaN)."""
    amax = torch.maximum(rows.amax(dim=1, keepdim=True), -rows.amin(dim=1, keepdim=True)).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


KERNELS: dict[str, Callable] = {"int8": int8_linear, "fp8": fp8_linear}


def _takes(x: torch.Tensor, codes: torch.Tensor, fmt: str, cuda: bool) -> bool:
    """Shapes and dtypes the kernel handles; anything else runs weight-only."""
    k, n = codes.shape[1], codes.shape[0]
    if x.shape[:-1].numel() < MIN_ROWS or k % WIDTH_MULTIPLE or n % WIDTH_MULTIPLE:
        return False
    return not (cuda and fmt == "fp8" and x.dtype != torch.bfloat16)   # CUDA row-wise fp8 writes bf16 only


def fast_kernel(fmt: str, cuda: bool, count: list | None = None) -> Callable:
    """QuantLinear.matmul for weight format `fmt`: the fast kernel, or None (-> weight-only) for calls it does not
    take. `count`, if given, gets [fast calls, weight-only calls] added up."""
    kernel = KERNELS[fmt]

    def matmul(x, codes, scale, bias):
        takes = _takes(x, codes, fmt, cuda)
        if count is not None and not torch.compiler.is_compiling():   # a traced count would recompile per call
            count[0 if takes else 1] += 1
        return kernel(x, codes, scale, bias) if takes else None
    return matmul


def choose(mode: str, fmt: str | None, device_type: str, capability: tuple[int, int] | None) -> tuple[str | None, str]:
    """(weight format whose fast kernel to use, or None for weight-only; why). Pure: the card is passed in."""
    if mode not in MODES:
        raise ValueError(f"unknown matmul mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "weight-only":
        return None, "exact"
    if fmt not in KERNEL_TABLE:
        return None, f"fast matmul needs an int8 or fp8 folder (this one holds {fmt} weights); using weight-only"
    need, what = KERNEL_TABLE[fmt]
    if device_type != "cuda" or capability is None:
        return None, f"{what} is only faster on a GPU with {fmt} tensor cores; using weight-only on {device_type}"
    if tuple(capability) < need:
        return None, (f"{what} needs compute capability {need[0]}.{need[1]}+, this card has "
                      f"{capability[0]}.{capability[1]}; using weight-only")
    return fmt, f"{what} (compute capability {capability[0]}.{capability[1]})"


def choose_matmul(profile: Profile, fmt: str | None, card: Target) -> tuple[str | None, str]:
    """The matmul a run of `profile` on a folder of weight format `fmt` uses on `card` (see `choose`): the one
    choice of a real run (its device's card; the run then probes the kernel) and of the memory plan (the
    profile's target card)."""
    return choose(profile.matmul, fmt, card.device_type, card.capability)


def device_capability(device) -> tuple[int, int] | None:
    """Compute capability of a CUDA `device`; None for any other device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


PROBE_TOLERANCE = 0.1    # relative error of a probe against weight-only (the activation rounding: ~1% int8, ~3% fp8)


def probe(fmt: str, device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Run the `fmt` kernel once on small tensors on `device` (activations (2, 48, 256) in `dtype`, weights of 128
    rows quantized to `fmt`) and compare it with the weight-only matmul of the same weights: None if it works, else
    why (the error's first line, or the relative error of a wrong result). A torch build or card without the kernel
    then falls back or is refused before the run instead of failing mid-run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 256, generator=g).to(device, dtype)
    codes, scale = quantize_rows(torch.randn(128, 256, generator=g) * 0.05, FORMATS[fmt])
    codes, scale = codes.to(device), scale.to(device)
    try:
        got = KERNELS[fmt](x, codes, scale, None)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)    # an asynchronous kernel error surfaces here, not mid-run
    except (RuntimeError, NotImplementedError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    want = torch.nn.functional.linear(x.float(), dequantize(codes, scale, torch.float32))
    error = float((got.float() - want).norm() / want.norm())
    if got.shape != want.shape or not error <= PROBE_TOLERANCE:
        return f"wrong result (relative error {error:.3g} against weight-only, more than {PROBE_TOLERANCE})"
    return None


def attach_matmul(model: nn.Module, kernel_format: str | None, cuda: bool) -> Handle:
    """Point every QuantLinear of `model` with codes of `kernel_format` at the fast kernel (None: weight-only for
    all, nothing changed). The handle's `value` is the live [fast calls, weight-only fallbacks] counter."""
    count = [0, 0]
    with attaching(model, "matmul") as handle:
        if kernel_format is not None:
            for m in model.modules():
                if isinstance(m, QuantLinear) and m.fmt.name == kernel_format:
                    handle.set(m, "matmul", fast_kernel(kernel_format, cuda, count))
    handle.value = count
    return handle
