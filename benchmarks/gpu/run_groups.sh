#!/usr/bin/env bash
# Per-GPU caps for groups on the GPU machine (as root, from a checkout), in one call:
#   OUT=/some/dir bash benchmarks/gpu/run_groups.sh [TEST_FILTER]
# Rebuilds libchronos_cap.so from the source (its file layout is version 3 now: an
# older build must not be tested), then runs tests/gpu/test_groups_real.py (its
# two-GPU tests skip on one GPU; its group tests skip until `chronos run --gpus` exists)
# with NCCL_NVLS_ENABLE=0, and prints every test's outcome and its "[groups]" figure.
# TEST_FILTER is a pytest -k expression (e.g. "one_gpu or outside"). Cut off at TESTS_S
# (default 540 s).
set -u
out=${OUT:-/tmp/chronos-groups-out}
filter=${1:-}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
rm -f src/chronos/native/libchronos_cap.so
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$out/install.log" 2>&1 \
    || gcc -std=gnu11 -O2 -foptimize-sibling-calls -fvisibility=hidden -fPIC -shared -Wall \
        -Wextra -o src/chronos/native/libchronos_cap.so src/chronos/native/chronos_cap.c -ldl -lpthread
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv | tee "$out/nvidia-smi.txt"
nvidia-smi topo -m > "$out/topology.txt" 2>&1
timeout -k 10 "${TESTS_S:-540}" python3 -m pytest -m gpu tests/gpu/test_groups_real.py -s -rA \
    -p no:cacheprovider ${filter:+-k "$filter"} > "$out/groups.log" 2>&1
echo "pytest exit $?"
grep -h "\[groups\]" "$out/groups.log"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)" "$out/groups.log" | cut -c1-200
tail -n 3 "$out/groups.log"
