"""bench/stream_gpu.py and bench/stream_cpu.py at tiny sizes on the CPU: every code path except CUDA timing."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lowvram_stepvideo.loading.loaders import load_dit

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_stream_gpu_bench_tiny_on_cpu(tmp_path, capsys, fmt):
    out = tmp_path / "rows.json"
    _bench("stream_gpu").main(["--tiny", "--device", "cpu", "--format", fmt, "--json", str(out)])
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    layers, grids, batches, residents = 4, 2, 2, [0, 1]
    assert len(rows) == grids * batches * (1 + len(residents))
    assert table.count("\n| ") == len(rows) + 1 and f"{fmt}, prefetch 1" in table   # header row + one per run
    for r in rows:
        if r["mode"] == "resident":
            assert r["ratio"] == 1.0 and r["moved_gb"] == 0 and r["blocks"] == 0
        else:   # every streamed block crosses once per forward (4 or 3 blocks > the 2 slots)
            assert r["blocks"] == layers - r["resident"] and r["moved_gb"] > 0 and r["rate_gbs"] > 0
        assert r["seconds"] > 0 and r["peak_vram_gib"] is None
    assert result["link_gbs"] is None


def test_stream_cpu_bench_on_fixture_dit(fixture_dir, tmp_path, capsys):
    folder = fixture_dir / "model_dir"
    out = tmp_path / "rows.json"
    _bench("stream_cpu").main([str(folder), "--block", "1", "--repeats", "1", "--json", str(out)])
    assert "| disk (preadv) |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["disk (preadv)", "mmap (pageable)", "packed host RAM"]
    model = load_dit(folder / "transformer", torch.bfloat16)
    tensor_bytes = sum(p.numel() * p.element_size() for p in model.transformer_blocks[1].parameters())
    for r in rows:   # the slot image: every tensor, each padded to 512 bytes
        n_tensors = len(list(model.transformer_blocks[1].parameters()))
        assert tensor_bytes <= r["block_gb"] * 1e9 <= tensor_bytes + 512 * n_tensors
        assert r["first_gbs"] > 0 and r["warm_gbs"] > 0
