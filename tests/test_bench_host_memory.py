"""bench/host_memory.py at a tiny size on the demo model: the plan-vs-measured rows and their JSON shape."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "host_memory.py"


@pytest.mark.slow
def test_host_memory_bench_tiny_json(demo_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_host_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model-dir", str(demo_dir), "--frames", "17", "--height", "32", "--width", "48", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["phase"] for r in rows] == ["text", "denoise", "decode"]
    for r in rows:
        assert set(r) == {"phase", "planned_bytes", "measured_bytes", "ratio"}
        assert isinstance(r["planned_bytes"], int) and r["planned_bytes"] > 0
        assert isinstance(r["measured_bytes"], int) and r["measured_bytes"] > 0
        assert r["ratio"] == round(r["measured_bytes"] / r["planned_bytes"], 3)
