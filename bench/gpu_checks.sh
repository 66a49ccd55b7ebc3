#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU (the `device` tool; its machine has torch with CUDA but not
# pytest, and no network; nothing here writes an mp4, so imageio-ffmpeg (a 68 MB wheel) is not needed):
#
#   here:    pip download -d gpu-wheels pytest      (once, 1.8 MB; gpu-wheels/ is git-ignored)
#   device:  run(command="bash bench/gpu_checks.sh", carry=["gpu-wheels"], timeout_s=600)
#
# Each check has its own time limit (together 9 minutes at most, under the device's 10 minutes a command), so one
# slow check cannot use up the others' time; the short ones run first. Outputs go to $OUT (the device tool's result
# folder; else gpu-results/), one file a check ending in its exit status, and the card's name to card.csv; the
# probes' and the calibration's caches (probes.json, calibration.json) to cache/. Paste the tables into
# BENCHMARKS.md with it. The compiled rows of speed_gpu.py (minutes of compiling) need a call of their own:
# python bench/speed_gpu.py --json.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$out/card.csv" 2>&1
cat "$out/card.csv"
python -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links gpu-wheels pytest

check() {   # check NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit status $?" >> "$out/$name.txt"
    tail -n 25 "$out/$name.txt"
}

# the card against the card table, every attention kernel and fast matmul probed on it
check probes 35 env LOWVRAM_STEPVIDEO_CACHE="$out/cache" python bench/probes_gpu.py
check pytest-gpu 90 python -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py)
[ -f tests/test_syncs.py ] && check syncs 60 python -m pytest -q -p no:cacheprovider tests/test_syncs.py
check calibrate 65 env LOWVRAM_STEPVIDEO_CACHE="$out/cache" python bench/speed_gpu.py --calibrate
check plan-vs-gpu 80 python bench/plan_vs_gpu.py --demo --profile 24gb
check stream-gpu 100 python bench/stream_gpu.py
check speed-gpu 100 python bench/speed_gpu.py --json --skip compile
