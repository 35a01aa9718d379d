#!/usr/bin/env bash
# The allocation-time cap on the GPU machine, in one call (as root, from a checkout):
#   OUT=/some/dir bash benchmarks/gpu/run_alloc_cap.sh [all|tests|bench]
# (GPU_TESTS=tests/gpu runs the whole GPU suite in the tests step, not only the cap's.)
# Installs the checkout (pip install -e ., which builds libchronos_cap.so; no network
# needed), runs tests/gpu/test_allocation_cap_real.py and the overhead benchmark, and
# writes every step's log under $OUT. A failing step is reported and the next one runs.
# "all" stays under 9 minutes: the tests are cut off at TESTS_S (260 s; 128 s last
# run) and the benchmark at BENCH_S (240 s; 192 s last run). The output ends with a
# compact summary (every test's outcome, every figure), so its last 12,000 characters
# hold everything that matters; the full logs are under $OUT.
set -u
what=${1:-all}
out=${OUT:-/tmp/chronos-alloc-cap-out}
tests_s=${TESTS_S:-260}
gpu_tests=${GPU_TESTS:-tests/gpu/test_allocation_cap_real.py}
bench_s=${BENCH_S:-240}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
summary="$out/summary.txt"
steps="$out/steps.txt"
: > "$steps"
began=$SECONDS

step() {  # step NAME COMMAND...: run it, log to $out/NAME.log, record its status
    local name=$1; shift
    echo "=== [$name] $*" | cut -c1-200
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "=== [$name] exit $rc after $((SECONDS - start)) s" | tee -a "$steps"
    tail -n 3 "$out/$name.log" | cut -c1-300
    return 0
}

step versions sh -c 'python3 --version; gcc --version | head -1; (nvcc --version || /usr/local/cuda/bin/nvcc --version) | tail -1; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c "import torch, jax, cupy; print(\"torch\", torch.__version__, \"jax\", jax.__version__, \"cupy\", cupy.__version__)"'
# A library left by an earlier run may be older than the source (and its file layout):
# never test that one.
rm -f src/chronos/native/libchronos_cap.so
step install python3 -m pip install --no-build-isolation --no-deps --no-index -e .
# Should pip not build it (old setuptools in the image), build the library directly, and
# make the checkout importable without the install.
if [ ! -f src/chronos/native/libchronos_cap.so ]; then
    step build-library gcc -std=gnu11 -O2 -foptimize-sibling-calls -fvisibility=hidden -fPIC \
        -shared -Wall -Wextra -o src/chronos/native/libchronos_cap.so \
        src/chronos/native/chronos_cap.c -ldl -lpthread
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step library sh -c 'ls -l src/chronos/native/libchronos_cap.so; python3 -c "from chronos import alloccap; print(alloccap.library_path())"'
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
    step gpu-tests timeout -k 10 "$tests_s" python3 -m pytest -m gpu \
        $gpu_tests -s -rA -p no:cacheprovider \
        --junitxml="$out/junit.xml"
    grep -h "\[alloc-cap\]" "$out/gpu-tests.log" > "$out/gpu-tests-figures.txt" 2>/dev/null
fi
if [ "$what" != tests ]; then
    step bench timeout -k 10 "$bench_s" python3 benchmarks/gpu/bench_alloc_cap.py --out "$out"
    grep -h "\[bench-alloc-cap\]" "$out/bench.log" | grep -- "->" > "$out/bench-figures.txt" 2>/dev/null
fi

{
    echo "=================== summary ($((SECONDS - began)) s in all; logs in $out)"
    head -5 "$out/versions.log" 2>/dev/null | cut -c1-160
    cat "$steps"
    if [ -f "$out/junit.xml" ]; then
        python3 - "$out/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

cases = list(ET.parse(sys.argv[1]).iter("testcase"))
ok = []
for case in cases:
    base, _, param = case.get("name", "?").removeprefix("test_").partition("[")
    name = "_".join(base.split("_")[:4]) + (f"[{param}" if param else "")
    seconds = f"{float(case.get('time', 0)):.0f} s"
    bad = case.find("failure")
    if bad is None:
        bad = case.find("error")
    skipped = case.find("skipped")
    if bad is not None:
        why = (bad.get("message") or "").replace("\n", " ")[:200]
        print(f"FAIL {name} ({seconds}): {why}")
    elif skipped is not None:
        print(f"SKIP {name}: {(skipped.get('message') or '')[:120]}")
    else:
        ok.append(f"{name} ({seconds})")
print(f"ok ({len(ok)} of {len(cases)}): " + ", ".join(ok))
PY
    elif [ "$what" != bench ]; then
        echo "no junit.xml: the tests did not finish (cut off at ${tests_s} s?)"
    fi
    grep -E "[0-9]+ (passed|failed|skipped)" "$out/gpu-tests.log" 2>/dev/null | tail -1
    echo "--- figures"
    cat "$out/gpu-tests-figures.txt" "$out/bench-figures.txt" 2>/dev/null | cut -c1-600
} | tee "$summary"
