#!/usr/bin/env bash
# The allocation-time cap on the GPU machine, in one call (as root, from a checkout):
#   OUT=/some/dir bash benchmarks/gpu/run_alloc_cap.sh [all|tests|bench]
# (all: about 8-9 minutes; split it into "tests" then "bench" under a 10-minute limit)
# Installs the checkout (pip install -e ., which builds libchronos_cap.so; no network
# needed), runs tests/gpu/test_allocation_cap_real.py and the overhead benchmark, and
# writes every step's log under $OUT. A failing step is reported and the next one runs.
set -u
what=${1:-all}
out=${OUT:-/tmp/chronos-alloc-cap-out}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME COMMAND...: run it, log to $out/NAME.log, record its status
    local name=$1; shift
    echo "=== [$name] $*" | tee -a "$summary"
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "=== [$name] exit $rc after $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 40 "$out/$name.log"
    return 0
}

step versions sh -c 'python3 --version; gcc --version | head -1; (nvcc --version || /usr/local/cuda/bin/nvcc --version) | tail -2; nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total --format=csv; python3 -c "import torch, sys; print(\"torch\", torch.__version__)"; python3 -c "import jax; print(\"jax\", jax.__version__)"; python3 -c "import cupy; print(\"cupy\", cupy.__version__)"'
step install python3 -m pip install --no-build-isolation --no-deps --no-index -e .
# Should pip not build it (old setuptools in the image), build the library directly, and
# make the checkout importable without the install.
if [ ! -f src/chronos/native/libchronos_cap.so ]; then
    step build-library gcc -std=gnu11 -O2 -foptimize-sibling-calls -fvisibility=hidden -fPIC \
        -shared -Wall -Wextra -o src/chronos/native/libchronos_cap.so \
        src/chronos/native/chronos_cap.c -ldl -lpthread
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step library sh -c 'ls -l src/chronos/native/; nm -D --defined-only src/chronos/native/libchronos_cap.so | grep -c " T "; python3 -c "from chronos import alloccap; print(alloccap.library_path())"'
# The tests run the CLI as new accounts: they must reach the checkout and python.
step permissions python3 - <<'PY'
import os, sys
from pathlib import Path
for target in (Path(os.path.realpath(sys.executable)), Path.cwd().resolve()):
    for parent in [target, *target.parents] if target.is_dir() else target.parents:
        os.chmod(parent, parent.stat().st_mode | 0o005)
os.system(f"chmod -R o+rX {Path.cwd()}")
print("ok")
PY
if [ "$what" != bench ]; then
step gpu-tests python3 -m pytest -m gpu tests/gpu/test_allocation_cap_real.py -s -rA \
    -p no:cacheprovider --junitxml="$out/junit.xml"
grep -h "\[alloc-cap\]" "$out/gpu-tests.log" > "$out/gpu-tests-figures.txt" 2>/dev/null
fi
if [ "$what" != tests ]; then
step bench python3 benchmarks/gpu/bench_alloc_cap.py --out "$out"
grep -h "\[bench-alloc-cap\]" "$out/bench.log" | grep -- "->" > "$out/bench-figures.txt" 2>/dev/null
fi
echo "--- figures" | tee -a "$summary"
cat "$out/gpu-tests-figures.txt" "$out/bench-figures.txt" 2>/dev/null | tee -a "$summary"
grep -E "passed|failed|error" "$out/gpu-tests.log" | tail -3 | tee -a "$summary"
