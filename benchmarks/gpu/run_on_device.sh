#!/usr/bin/env bash
# On the GPU machine (as root): install the carried wheels (.whl/), then run the
# gpu-marked test suites and/or the GPU benchmark, with outputs under $OUT.
#   bash benchmarks/gpu/run_on_device.sh tests|bench|all
set -u
what=${1:-all}
out=${OUT:-/tmp/chronos-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
chmod -R o+rX /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
# The two-user test runs the CLI as new accounts: they must reach the checkout and python.
python3 - <<'PY'
import os, sys
from pathlib import Path
for target in (Path(os.path.realpath(sys.executable)), Path.cwd().resolve()):
    for parent in [target, *target.parents] if target.is_dir() else target.parents:
        os.chmod(parent, parent.stat().st_mode | 0o005)
PY
chmod -R o+rX "$PWD"
nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
    python3 -m pytest -m gpu tests/gpu -s -rA -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    python3 benchmarks/gpu/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
fi
