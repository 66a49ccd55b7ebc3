"""bench/speed_gpu.py on the CPU (small size, no compile): the rows, their ratios to the same run's baseline."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "speed_gpu.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_speed_bench_runs_the_cpu_levers_as_a_json_list(capsys):
    spec = importlib.util.spec_from_file_location("bench_speed_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--json", "--skip", "compile", "--repeats", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and all({"lever", "tokens", "seconds", "ratio"} <= set(r) for r in rows)
    dit = [r for r in rows if r["component"] == "dit block"]
    levers = {r["lever"] for r in dit}
    assert {"baseline: sdpa + weight-only int8, eager", "weight-only fp8", "matmul int8 x int8",
            "matmul fp8 x fp8"} <= levers and any(name.startswith("best: ") for name in levers)
    assert sorted({r["tokens"] for r in dit}) == [96, 192]
    for r in dit:
        assert r["seconds"] > 0 and r["ratio"] > 0
        if r["lever"].startswith("baseline"):
            assert r["ratio"] == 1.0
    assert [r["component"] for r in rows].count("vae chunk") == 1
