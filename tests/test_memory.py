"""ByteAccountant: live/peak bytes per device, injected limits, untracked blocks, fake tensors."""
import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowvram_stepvideo.planning.byte_count import ByteAccountant

MiB = 2**20


def test_counts_live_and_peak_bytes_with_views_once():
    acc = ByteAccountant()
    with acc:
        a = torch.ones(MiB // 4)            # 1 MiB float32
        view = a.view(-1, 4)                # same storage: not counted again
        b = a * 2                           # +1 MiB
        assert acc.live["cpu"] == 2 * MiB
        del a, view
        gc.collect()
        assert acc.live["cpu"] == MiB       # a's storage went with its last view; b remains
        del b
        gc.collect()
    assert acc.live["cpu"] == 0
    assert acc.peak["cpu"] == 2 * MiB


def test_storage_freed_only_after_last_view():
    acc = ByteAccountant()
    with acc:
        a = torch.zeros(MiB // 4)
        view = a[10:]
        del a
        gc.collect()
        assert acc.live["cpu"] == MiB
        del view
        gc.collect()
    assert acc.live["cpu"] == 0


def test_injected_limit_raises_out_of_memory_before_counting():
    acc = ByteAccountant(limits={"cpu": 3 * MiB})
    with pytest.raises(torch.OutOfMemoryError, match="injected limit"):
        with acc:
            keep = [torch.ones(MiB // 4) for _ in range(3)]
            torch.ones(MiB // 4)
    assert acc.live["cpu"] == 3 * MiB
    del keep


def test_untracked_and_base_bytes():
    acc = ByteAccountant()
    acc.add_base("cpu", 5 * MiB)
    with acc:
        with acc.untracked():
            x = torch.ones(MiB // 4)
        assert acc.total("cpu") == 5 * MiB
        y = x + 1
        assert acc.total("cpu") == 6 * MiB
    assert acc.peak["cpu"] == 6 * MiB
    del y


def test_fake_tensors_on_meta_are_counted_without_allocation():
    acc = ByteAccountant()
    with FakeTensorMode(allow_non_fake_inputs=True), acc:
        x = torch.empty(1024, 2**20, device="meta", dtype=torch.bfloat16)   # 2 GiB, never allocated
        y = x * 2
        del x
        gc.collect()
        assert acc.live["meta"] == 2 * 2**30
        acc.reset_peak()
        del y
        gc.collect()
    assert acc.peak["meta"] == 2 * 2**30
    assert acc.live["meta"] == 0
