"""Per-call cost of the allocation-time cap library on the fake driver (no GPU needed).

What the per-GPU work added to the hot path (one ``cuCtxGetDevice`` and one relaxed
load per allocation) measured side by side with the base commit's library, in one run,
rounds interleaved: no library, the base library (one file, layout v2), this library
with one file (a one-GPU partition) and with two (a group, allocating on its second
GPU). The driver is tests/native/fake_cuda.c, so the figures are the library's own cost
plus a trivial fake call, not a GPU's; the GPU figures are benchmarks/gpu/bench_alloc_cap.py.

    .venv/bin/python benchmarks/bench_alloc_cap_fake.py [--rounds 15] [--base fe6d9fd]

Prints p50/p99 over rounds of each round's mean ns per cuMemAlloc_v2 + cuMemFree_v2 pair
(4 KiB), and per cuMemAllocAsync + cuMemFreeAsync pair (2 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, percentile

sys.path.insert(0, str(ROOT / "tests"))

from chronos import alloccap  # noqa: E402

NATIVE = ROOT / "src" / "chronos" / "native"
FAKE = ROOT / "tests" / "native" / "fake_cuda.c"
MICRO = ROOT / "benchmarks" / "gpu" / "alloc_cap_micro.c"
V2_HEADER = struct.Struct("<IIqqqIIqq8x")  # the base commit's layout
FAKE_UUIDS = [f"GPU-1{d}111213-1415-1617-1819-1a1b1c1d1e1f" for d in (0, 1)]  # fake_cuda.c


def cc(*argv: str) -> None:
    subprocess.run(["cc", "-std=gnu11", "-O2", *argv], check=True)


def build(where: Path, base: str) -> dict[str, Path]:
    cc("-fPIC", "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(where / "libcuda.so.1"), str(FAKE))
    (where / "libcuda.so").symlink_to("libcuda.so.1")
    cc("-o", str(where / "micro"), str(MICRO), "-ldl")
    old = where / "base"
    old.mkdir()
    for name in ("chronos_cap.c", "chronos_cap.h"):
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{base}:src/chronos/native/{name}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        (old / name).write_text(text)
    libs = {}
    for label, source in (("base", old / "chronos_cap.c"), ("new", NATIVE / "chronos_cap.c")):
        libs[label] = where / f"libcap_{label}.so"
        cc("-fPIC", "-shared", "-fvisibility=hidden", "-o", str(libs[label]), str(source),
           "-ldl", "-lpthread")  # fmt: skip
    return libs


def v2_file(path: Path, limit: int) -> Path:
    reserve, margin = alloccap.process_reserve(limit), alloccap.partition_margin(limit)
    header = V2_HEADER.pack(alloccap.MAGIC, 2, limit, reserve, 0, 256, 0, 0, margin)
    path.write_bytes(header + bytes(64 + 256 * 40 - len(header)))
    return path


def run(where: Path, env: dict[str, str]) -> dict[str, float]:
    full = {**os.environ, "LD_LIBRARY_PATH": str(where), **env}
    out = subprocess.run([str(where / "micro")], env=full, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--base", default="fe6d9fd")
    args = parser.parse_args()
    limit = 40 << 30
    with tempfile.TemporaryDirectory(prefix="chronos-capbench-") as tmp:
        where = Path(tmp)
        libs = build(where, args.base)
        one = alloccap.create_file(where / "one.cap", limit)
        pair = [alloccap.create_file(where / f"g{d}.cap", limit, device_uuid=FAKE_UUIDS[d])
                for d in (0, 1)]  # fmt: skip
        setups = {
            "no library": {},
            f"base {args.base} (1 file)": {
                "LD_PRELOAD": str(libs["base"]),
                "CHRONOS_CAP_FILE": str(v2_file(where / "v2.cap", limit)),
            },
            "this (1 GPU)": {"LD_PRELOAD": str(libs["new"]), "CHRONOS_CAP_FILE": str(one)},
            # a group whose second file names the device in use (ordinal 0), found by UUID
            "this (group, 2nd GPU)": {
                "LD_PRELOAD": str(libs["new"]),
                "CHRONOS_CAP_FILE": ":".join(map(str, [pair[1], pair[0]])),
                "FAKE_CUDA_DEVICES": "2",
            },
        }
        samples: dict[str, dict[str, list[float]]] = {k: {} for k in setups}
        for _ in range(args.rounds):
            for label, env in setups.items():  # interleaved: drift hits every setup alike
                for key, value in run(where, env).items():
                    samples[label].setdefault(key, []).append(value)
    print(f"{'setup':28} {'alloc+free 4K p50/p99 ns':>26} {'async pair 2M p50/p99 ns':>26}")
    for label, got in samples.items():
        cells = []
        for key in ("alloc_free_4k_ns", "async_pair_2m_ns"):
            values = sorted(got[key])
            cells.append(f"{percentile(values, 50):.0f} / {percentile(values, 99):.0f}")
        print(f"{label:28} {cells[0]:>26} {cells[1]:>26}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
