"""Several processes, one video (launched by torchrun): CFG parallel and Ulysses sequence parallel.

- CFG parallel (degree 2): each half of the ranks runs one branch of the guided pair (cond or uncond); the two
  velocities meet once per step (all_gather), and every rank then takes the same Euler step from the same data,
  so the latents stay identical on every rank.
- Sequence parallel (Ulysses, degree P): the DiT's tokens are split into P contiguous runs. Every token-wise op runs
  on the local run; self-attention trades tokens for heads with an all-to-all (each rank attends over the whole
  sequence for its share of the heads) and back; cross-attention stays local (its keys are the text); RoPE uses
  the global positions of the local run; the final layer's output is gathered. Same math per head.
Ranks: rank = cfg_rank * P + seq_rank, so a sequence group is P consecutive ranks (one node's fast links carry the
all-to-alls). The engines attach to a loaded DiT from outside (`attach`, through attach.py); the model's code does
not change.

Every collective runs under the process group's timeout (`LOWVRAM_STEPVIDEO_PARALLEL_TIMEOUT`, seconds), so a rank
that died or hangs ends the others with an error instead of a hang. Only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import StepVideoError
from ..models.dit import SelfAttention, WholeSequence, key_mask_rows
from .attach import Attachments, attaching

MODES = ("cfg", "sequence", "auto")
TIMEOUT_ENV = "LOWVRAM_STEPVIDEO_PARALLEL_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0   # longest wait between collectives: rank 0's text phase while the others wait


class ParallelError(StepVideoError):
    """A parallel run that cannot start (bad mode for the rank count, no torchrun)."""


class LostRank(ParallelError):
    """A collective failed: another process died, hit an error, or did not answer within the timeout."""


PLANNED = "planned"   # the group of a memory plan's engines: buffers are allocated as in a run, nothing is sent


def _collective(fn, *args, **kwargs):
    """fn(*args, **kwargs) for a torch.distributed collective; its failure becomes one LostRank line."""
    if kwargs.get("group") is PLANNED:
        return None
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:   # DistBackendError, gloo's connection / timeout errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise LostRank(f"rank {rank} lost the other processes ({first[:160]}); another rank died, failed or "
                       f"hung past the {collective_timeout().total_seconds():g} s timeout ({TIMEOUT_ENV})") from None


@dataclass(frozen=True)
class Layout:
    """How `world` ranks divide the work: `cfg` branches (1 or 2) x `sequence` token runs."""
    world: int
    rank: int
    cfg: int
    sequence: int

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sequence

    @property
    def seq_rank(self) -> int:
        return self.rank % self.sequence

    def describe(self) -> str:
        parts = (["CFG x2"] if self.cfg == 2 else []) + ([f"sequence x{self.sequence}"] if self.sequence > 1 else [])
        return f"{self.world} processes: " + (" and ".join(parts) or "no split")


def layout_for(mode: str, world: int, rank: int = 0) -> Layout:
    """cfg: 2 ranks, one branch each; sequence: all ranks split the tokens; auto: CFG x2 when the rank count is
    even (times a sequence split of world/2), else the sequence split alone."""
    if mode not in MODES:
        raise ParallelError(f"unknown --parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "cfg" and world != 2:
        raise ParallelError(f"--parallel cfg needs exactly 2 processes, torchrun started {world}; "
                            "use --parallel auto (CFG x sequence) or sequence")
    cfg = 2 if mode == "cfg" or (mode == "auto" and world % 2 == 0) else 1
    return Layout(world, rank, cfg, world // cfg)


def token_counts(seq_len: int, parts: int) -> list[int]:
    """Tokens of each of `parts` contiguous runs covering seq_len (the first runs take one more when uneven)."""
    base, extra = divmod(seq_len, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


# ---------------------------------------------------------------- process groups

def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def processes_on_this_machine() -> int:
    """How many processes of this torchrun run share this machine's RAM (torchrun's LOCAL_WORLD_SIZE); 1 alone."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def collective_timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ParallelError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


class Parallel:
    """This process's place in the run: its layout, the process groups, and the few collectives the runner
    needs besides the DiT engines (broadcast of the text embeddings, agreeing on an outcome)."""

    def __init__(self, layout: Layout, device: torch.device):
        self.layout, self.device = layout, device
        self.cfg_group = self.seq_group = None
        timeout = collective_timeout()            # a new group does not inherit the default group's timeout
        for c in range(layout.cfg):               # every rank creates every group, in the same order
            group = dist.new_group(list(range(c * layout.sequence, (c + 1) * layout.sequence)), timeout=timeout)
            if c == layout.cfg_rank:
                self.seq_group = group
        for s in range(layout.sequence):
            group = dist.new_group([c * layout.sequence + s for c in range(layout.cfg)], timeout=timeout)
            if s == layout.seq_rank:
                self.cfg_group = group

    @classmethod
    def planned(cls, layout: Layout) -> "Parallel":
        """One rank of `layout` for a memory plan: engines allocate what they would, but no process group."""
        par = cls.__new__(cls)
        par.layout, par.device = layout, torch.device("cpu")
        par.cfg_group = par.seq_group = PLANNED
        return par

    @property
    def writer(self) -> bool:
        """Only rank 0 writes files (video, sidecar, checkpoints, caches)."""
        return self.layout.rank == 0

    def broadcast_from_writer(self, value):
        """`value` as rank 0 has it (any picklable object; tensors travel through the CPU)."""
        box = [_to_cpu(value) if self.writer else None]
        _collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def all_agree(self, ok: bool) -> bool:
        """True only when `ok` holds on every rank (the OOM ladder steps down everywhere or nowhere)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._comm_device())
        _collective(dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def agree_max(self, value: int) -> int:
        """The largest `value` of all ranks (e.g. the most cautious position on the preset ladder)."""
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_from_env(mode: str, device_type: str = "cpu") -> Parallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): NCCL on
    CUDA (one GPU per local rank), gloo on the CPU."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    layout = layout_for(mode, world, rank)
    timeout = collective_timeout()
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return Parallel(layout, device)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# ---------------------------------------------------------------- sequence parallel

class SequenceSplit(WholeSequence):
    """The DiT's token layout across a sequence group: this rank runs tokens [start, stop) of the sequence."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.counts: list[int] = []   # tokens per rank of the current forward

    def scatter(self, h: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        """h (B, S, D), rope_cos/sin (S, 128) -> this rank's run of each; RoPE keeps the global positions."""
        self.counts = token_counts(h.shape[1], self.size)
        start = sum(self.counts[:self.rank])
        run = slice(start, start + self.counts[self.rank])
        return h[:, run], rope_cos[run], rope_sin[run]

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """(B, S_r, E) of each rank -> (B, S, E) on every rank (runs padded to the longest for all_gather)."""
        longest = max(self.counts)
        padded = out.new_zeros((out.shape[0], longest) + tuple(out.shape[2:]))
        padded[:, :out.shape[1]] = out
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        _collective(dist.all_gather, parts, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, self.counts)], dim=1)


class UlyssesAttention:
    """Self-attention over the whole sequence from each rank's run of tokens: all-to-all to (all tokens, this
    rank's heads), the wrapped kernel, all-to-all back. Head counts that do not divide by the group size are
    padded with zero heads (they attend to nothing useful and are dropped)."""

    def __init__(self, inner, split: SequenceSplit):
        self.inner, self.split = inner, split

    def __call__(self, q, k, v, mask=None) -> torch.Tensor:
        """q/k/v (B, S_r, G, Dh) for this rank's tokens -> (B, S_r, G, Dh)."""
        if mask is not None:
            raise ValueError("sequence-parallel self-attention takes no key mask")
        heads = q.shape[2]
        per_rank = -(-heads // self.split.size)
        q, k, v = (self._to_heads(_pad_heads(t, per_rank * self.split.size)) for t in (q, k, v))
        return self._to_tokens(self.inner(q, k, v))[:, :, :heads]

    def _to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S_r, P*g, Dh) -> (B, S, g, Dh): every rank's tokens for this rank's g heads."""
        b, s_r, _, dh = t.shape
        p, counts = self.split.size, self.split.counts
        send = t.reshape(b, s_r, p, -1, dh).permute(2, 1, 0, 3, 4).reshape(p * s_r, b, -1, dh)  # by destination
        recv = send.new_empty((sum(counts),) + tuple(send.shape[1:]))                           # (S, B, g, Dh)
        _collective(dist.all_to_all_single, recv, send, output_split_sizes=counts, input_split_sizes=[s_r] * p,
                               group=self.split.group)
        return recv.permute(1, 0, 2, 3).contiguous()

    def _to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """(B, S, g, Dh) of this rank's heads -> (B, S_r, P*g, Dh): this rank's tokens, every head."""
        b, _, g, dh = o.shape
        p, counts = self.split.size, self.split.counts
        s_r = counts[self.split.rank]
        send = o.permute(1, 0, 2, 3).contiguous()                                               # (S, B, g, Dh)
        recv = send.new_empty((p * s_r, b, g, dh))
        _collective(dist.all_to_all_single, recv, send, output_split_sizes=[s_r] * p, input_split_sizes=counts,
                               group=self.split.group)
        return recv.view(p, s_r, b, g, dh).permute(2, 1, 0, 3, 4).reshape(b, s_r, p * g, dh)


def _pad_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    if t.shape[2] == heads:
        return t
    pad = t.new_zeros(t.shape[:2] + (heads - t.shape[2],) + t.shape[3:])
    return torch.cat([t, pad], dim=2)


# ---------------------------------------------------------------- CFG parallel

class CfgSplit:
    """Forward hooks on the DiT: of a batch-2 call (cond, uncond), this rank runs its branch; the velocities of the
    two branches are gathered back into a batch of 2 on every rank."""

    def __init__(self, group, rank: int):
        self.group, self.rank = group, rank

    def pick_branch(self, module, args, kwargs):
        return tuple(self._branch(a) for a in args), {k: self._branch(v) for k, v in kwargs.items()}

    def _branch(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.shape[0] != 2:
            raise ValueError(f"CFG parallel needs the guided pair as a batch of 2 (cfg_mode 'batch'), "
                             f"got batch {value.shape[0]}")
        return key_mask_rows(value, slice(self.rank, self.rank + 1))   # a key mask keeps its lengths

    def gather(self, module, args, kwargs, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(2)]
        _collective(dist.all_gather, parts, out.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)


# ---------------------------------------------------------------- attach

def attach(dit: nn.Module, par: Parallel) -> Attachments:
    """Run `dit` per `par.layout`: sequence parallel (its `sequence` split and the all-to-all around each
    self-attention kernel; after the attention kernel is attached, see attach.ORDER) and CFG parallel (hooks
    picking this rank's branch and gathering both). With CFG parallel, the caller passes the guided pair as one
    batch of 2."""
    layout = par.layout
    with Attachments() as done:
        if layout.sequence > 1:
            with attaching(dit, "sequence_parallel") as handle:
                split = SequenceSplit(par.seq_group, layout.seq_rank, layout.sequence)
                handle.set(dit, "sequence", split)
                for m in dit.modules():
                    if isinstance(m, SelfAttention):
                        handle.set(m, "attend", UlyssesAttention(m.attend, split))
            done.add(handle)
        if layout.cfg == 2:
            with attaching(dit, "cfg_parallel") as handle:
                cfg = CfgSplit(par.cfg_group, layout.cfg_rank)
                handle.hook(dit.register_forward_pre_hook(cfg.pick_branch, with_kwargs=True))
                handle.hook(dit.register_forward_hook(cfg.gather, with_kwargs=True))
            done.add(handle)
    return done
