"""The allocation-time cap library against a fake CUDA driver (no GPU needed).

Every way into the driver (linked symbols, dlopen + dlsym, cuGetProcAddress with
_v2 and _ptsz variants) and every allocation path (synchronous, stream-ordered
pools, VMM, arrays) must stop at exactly the partition's bytes with
CUDA_ERROR_OUT_OF_MEMORY, and cuMemGetInfo must report the share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chronos import alloccap
from chronos.models import PartitionRecord, ProcessUse

from .conftest import CHUNK, FAKE_TOTAL, GIB, MIB, STRICT, Native, allowed, compile_c, reserve_of

MODES = ["direct", "dlsym", "gpa", "gpa-ptsz"]
LIMIT = 10 * GIB


def words(lines: list[list[str]], name: str) -> list[str]:
    return next(line for line in lines if line[0] == name)


def state(path: Path) -> alloccap.CapState:
    got = alloccap.read_file(path)
    assert got is not None
    return got


# ------------------------------------------------------------------------ the build
def test_the_library_compiles_warning_free_and_exports_only_the_entry_points(
    native: Native,
) -> None:
    exported = subprocess.run(
        ["nm", "-D", "--defined-only", str(native.library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    names = {w for w in exported if w.startswith(("cu", "dlsym"))}
    assert native.strict_library.exists()  # built with -Wall -Wextra -Werror by the fixture
    assert "dlsym" in names and "cuMemAlloc_v2" in names and "cuGetProcAddress_v2" in names
    functions = [exported[i + 1] for i, w in enumerate(exported) if w == "T"]
    helpers = {"chronos_cap_raise_overhead"}  # for the daemon, through ctypes
    assert all(n.startswith("cu") or n == "dlsym" or n in helpers for n in functions), functions


# ----------------------------------------------------------------- synchronous paths
@pytest.mark.parametrize("mode", MODES)
def test_synchronous_allocations_stop_exactly_at_the_share(
    native: Native, cap_file: Path, mode: str
) -> None:
    out = native.run(native.capped(cap_file), mode, "devtotal", f"fill:{CHUNK}", "info", "used")
    filled = words(out, "fill")
    assert int(filled[1]) == allowed(LIMIT)
    assert filled[2] == "2"  # CUDA_ERROR_OUT_OF_MEMORY, nothing else
    assert int(words(out, "used")[1]) == allowed(LIMIT)  # the device holds exactly that
    info = words(out, "info")
    assert int(info[3]) == LIMIT  # total: the share, not the 80 GiB device
    assert int(info[2]) == alloccap.allocatable(LIMIT) - allowed(LIMIT)
    assert int(words(out, "devtotal")[2]) == LIMIT


def test_the_margin_is_kept_free_below_the_share_as_the_file_says(
    native: Native, cap_file: Path
) -> None:
    """Allocations stop at the share less the reserve and the file's margin; the total
    reported stays the share."""
    margin = alloccap.partition_margin(LIMIT)
    assert margin == 256 * MIB and state(cap_file).margin_bytes == margin
    out = native.run(native.capped(cap_file), "dlsym", f"fill:{MIB}", "info")
    assert int(words(out, "fill")[1]) == LIMIT - reserve_of(LIMIT) - margin
    assert words(out, "info")[2:] == ["0", str(LIMIT)]
    # The library reads the margin from the file: with none, the whole share less the reserve.
    raw = bytearray(cap_file.read_bytes())
    fields = list(alloccap.HEADER.unpack_from(raw))
    fields[-2] = 0  # margin_bytes (the last field is the device UUID)
    alloccap.HEADER.pack_into(raw, 0, *fields)
    cap_file.write_bytes(bytes(raw))
    out = native.run(native.capped(cap_file), "dlsym", f"fill:{MIB}")
    assert int(words(out, "fill")[1]) == LIMIT - reserve_of(LIMIT)


@pytest.mark.parametrize("mode", MODES)
def test_a_freed_allocation_gives_its_bytes_back(native: Native, cap_file: Path, mode: str) -> None:
    out = native.run(native.capped(cap_file), mode, f"fill:{CHUNK}", "freeall", f"fill:{CHUNK}")
    fills = [line for line in out if line[0] == "fill"]
    assert [int(f[1]) for f in fills] == [allowed(LIMIT)] * 2
    assert state(cap_file).used_bytes == 0  # the process left: its slot went with it


def test_without_a_partition_everything_passes_through(native: Native) -> None:
    env = {**native.env(), "LD_PRELOAD": str(native.library)}
    out = native.run(env, "dlsym", f"fill:{GIB}", "info")
    assert int(words(out, "fill")[1]) == FAKE_TOTAL
    assert int(words(out, "info")[3]) == FAKE_TOTAL


def test_pitch_managed_and_unknown_frees(native: Native, cap_file: Path) -> None:
    out = native.run(
        native.capped(cap_file),
        "dlsym",
        "pitch:1000:1000",
        f"managed:{GIB}",
        "info",
        "freeunknown",
        "info",
        "freeall",
        "info",
    )
    pitch = words(out, "pitch")
    assert pitch[1] == "0" and pitch[2] == "1024"
    infos = [int(line[2]) for line in out if line[0] == "info"]
    counted = 1024 * 1000 + GIB
    assert infos[0] == alloccap.allocatable(LIMIT) - counted
    assert words(out, "freeunknown")[1] == "1"  # the driver's own answer, passed through
    assert infos[1] == infos[0]  # and nothing uncounted
    assert infos[2] == alloccap.allocatable(LIMIT)


def test_a_managed_allocation_over_the_share_is_refused(native: Native, cap_file: Path) -> None:
    out = native.run(native.capped(cap_file), "direct", f"managed:{LIMIT}", "used")
    assert words(out, "managed")[1] == "2"
    assert words(out, "used")[1] == "0"


# ------------------------------------------------------------ stream-ordered pools
@pytest.mark.parametrize("mode", MODES)
def test_the_async_pool_is_charged_for_what_it_reserves(
    native: Native, cap_file: Path, mode: str
) -> None:
    out = native.run(
        native.capped(cap_file),
        mode,
        f"asyncfill:{CHUNK}",
        "freeasync",
        f"asyncfill:{CHUNK}",
        "freeasync",
        "info",
        "trim",
        "info",
    )
    fills = [int(line[1]) for line in out if line[0] == "fill"]
    # Freed blocks stay in the pool (PyTorch's setting): reusing them is not counted twice.
    assert fills == [allowed(LIMIT)] * 2
    assert all(line[2] == "2" for line in out if line[0] == "fill")
    before, after = (int(line[2]) for line in out if line[0] == "info")
    assert before == alloccap.allocatable(LIMIT) - allowed(LIMIT)  # the pool still holds it
    assert after == alloccap.allocatable(LIMIT)  # trimmed: given back


@pytest.mark.parametrize("mode", ["dlsym", "gpa-ptsz"])
def test_an_explicit_pool_is_charged_until_destroyed(
    native: Native, cap_file: Path, mode: str
) -> None:
    out = native.run(
        native.capped(cap_file), mode, f"poolfill:{CHUNK}", "used", "pooldestroy", "info"
    )
    assert int(words(out, "fill")[1]) == allowed(LIMIT)
    assert int(words(out, "used")[1]) == allowed(LIMIT)
    assert int(words(out, "info")[2]) == alloccap.allocatable(LIMIT)


# --------------------------------------------------------------------------- VMM
@pytest.mark.parametrize("mode", MODES)
def test_vmm_memory_counts_until_released_and_unmapped(
    native: Native, cap_file: Path, mode: str
) -> None:
    out = native.run(
        native.capped(cap_file),
        mode,
        f"vmmfill:{CHUNK}",
        "vmmrelease",
        f"vmm:{CHUNK}",
        "vmmunmap",
        f"vmm:{CHUNK}",
        "used",
        f"vmmhost:{20 * GIB}",
    )
    assert int(words(out, "fill")[1]) == allowed(LIMIT)
    vmm = [line[1] for line in out if line[0] == "vmm"]
    assert vmm == ["2", "0"]  # released but still mapped: still counted; unmapped: free
    assert int(words(out, "used")[1]) == CHUNK
    assert words(out, "vmmhost")[1] == "0"  # host memory is not the GPU's


# ------------------------------------------------------------------------ arrays
def test_arrays_are_counted_and_given_back(native: Native, cap_file: Path) -> None:
    out = native.run(
        native.capped(cap_file),
        "gpa",
        "array:1024:1024",
        "array3d:64:64:64",
        "mipmap:1024:1024:3",
        "info",
        "array:65536:65536",
        "arraydestroy",
        "info",
    )
    counted = 4 * MIB + 1 * MIB + (1024 * 1024 + 512 * 512 + 256 * 256) * 4
    first, last = (int(line[2]) for line in out if line[0] == "info")
    assert first == alloccap.allocatable(LIMIT) - counted
    assert [line[1] for line in out if line[0] == "array"] == ["0", "2"]  # 16 GiB: refused
    assert last == alloccap.allocatable(LIMIT)


# ---------------------------------------------------------- one cap, many processes
def test_several_processes_share_one_cap_exactly(native: Native, cap_file: Path) -> None:
    env = native.capped(cap_file)
    chunk = 64 * MIB
    procs = [
        subprocess.Popen(
            [str(native.client), mode, "info", "wait", f"fill:{chunk}", "hold"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for mode in ("direct", "dlsym", "gpa-ptsz")
    ]
    try:
        for p in procs:  # every member holds its context (and reserve) before anyone fills
            assert p.stdout is not None and p.stdin is not None
            assert p.stdout.readline().startswith("info")
            assert p.stdout.readline().strip() == "wait"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        fills = []
        for p in procs:
            assert p.stdout is not None
            fills.append(p.stdout.readline().split())
        assert all(f[0] == "fill" and f[2] == "2" for f in fills)
        assert sum(int(f[1]) for f in fills) == allowed(LIMIT, processes=3, chunk=chunk)
        assert len(state(cap_file).slots) == 3
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)
    assert state(cap_file).used_bytes == 0


def test_the_share_of_a_sigkilled_member_is_reclaimed(native: Native, cap_file: Path) -> None:
    env = native.capped(cap_file)
    hog = subprocess.Popen(
        [str(native.client), "dlsym", f"fill:{CHUNK}", "hold"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert hog.stdout is not None
    assert int(hog.stdout.readline().split()[1]) == allowed(LIMIT)
    hog.send_signal(signal.SIGKILL)
    hog.wait(timeout=30)
    dead = state(cap_file)
    assert dead.used_bytes == reserve_of(LIMIT) + allowed(LIMIT)  # nobody has noticed yet
    assert alloccap.live_bytes(dead) == 0  # what `chronos stats` shows: the dead hold nothing
    out = native.run(env, "direct", f"fill:{CHUNK}")
    assert int(words(out, "fill")[1]) == allowed(LIMIT)  # the next member got it all back
    assert state(cap_file).used_bytes == 0


def test_a_forked_child_is_a_member_of_its_own(native: Native, cap_file: Path) -> None:
    code = (
        "import ctypes, os\n"
        "cu = ctypes.CDLL('libcuda.so.1')\n"
        "p = ctypes.c_uint64()\n"
        f"assert cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t({GIB})) == 0\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    os._exit(cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t({GIB})))\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=native.capped(cap_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "0", result.stderr
    # The parent gave its slot back at exit; the child left by _exit (no destructor), so
    # its slot - its own 1 GiB and reserve, not the parent's - waits to be reclaimed.
    left = state(cap_file)
    assert [(s.bytes, s.overhead) for s in left.slots] == [(GIB, reserve_of(LIMIT))]
    assert alloccap.live_bytes(left) == 0


# -------------------------------------------------------- dlsym and cuGetProcAddress
LOOKUPS = r"""
import ctypes, sys
libdl = ctypes.CDLL(None)
libdl.dlsym.restype = ctypes.c_void_p
libdl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
libdl.dlopen.restype = ctypes.c_void_p
libdl.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]

class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

def where(addr):
    info = Info()
    if not addr or not libdl.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return None
    return info.fname.decode().rsplit("/", 1)[-1] + ":" + (info.sname or b"?").decode()

cuda = libdl.dlopen(b"libcuda.so.1", 2)
libm = libdl.dlopen(b"libm.so.6", 2)
gpa = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p),
                       ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p)(
    libdl.dlsym(cuda, b"cuGetProcAddress_v2"))

def proc(name, flags=0, version=12000):
    out = ctypes.c_void_p()
    rc = gpa(name.encode(), ctypes.byref(out), version, flags, None)
    return where(out.value) if rc == 0 else rc

print("dlsym cuMemAlloc_v2", where(libdl.dlsym(cuda, b"cuMemAlloc_v2")))
print("dlsym cuMemAlloc_v2x", where(libdl.dlsym(cuda, b"cuMemAlloc_v2x")))
print("dlsym cuInit", where(libdl.dlsym(cuda, b"cuInit")))
print("dlsym cudnnCreate", where(libdl.dlsym(cuda, b"cudnnCreate")))
print("dlsym libm cuMemAlloc_v2", where(libdl.dlsym(libm, b"cuMemAlloc_v2")))
print("dlsym libm cos", where(libdl.dlsym(libm, b"cos")))
print("gpa cuMemAlloc", proc("cuMemAlloc"))
print("gpa cuMemAllocAsync", proc("cuMemAllocAsync"))
print("gpa cuMemAllocAsync ptsz", proc("cuMemAllocAsync", 2))
print("gpa cuMemFreeAsync ptsz", proc("cuMemFreeAsync", 2))
print("gpa cuMemGetInfo", proc("cuMemGetInfo"))
print("gpa cuInit", proc("cuInit"))
print("gpa cuGetProcAddress", proc("cuGetProcAddress"))
print("gpa cuMemAlloc future", proc("cuMemAlloc", 0, 99000))
"""


def test_dlsym_and_cu_get_proc_address_hand_out_our_wrappers_for_exact_names_only(
    native: Native, cap_file: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOOKUPS],
        env=native.capped(cap_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    ours = "libchronos_cap.so"
    assert got["dlsym cuMemAlloc_v2"] == f"{ours}:cuMemAlloc_v2"
    assert got["dlsym cuMemAlloc_v2x"] == "None"  # exact names only, never a prefix
    assert got["dlsym cuInit"] == "libcuda.so.1:cuInit"  # not wrapped: the driver's own
    assert got["dlsym cudnnCreate"] == "None"
    assert got["dlsym libm cuMemAlloc_v2"] == "None"  # that object has no such symbol
    assert got["dlsym libm cos"].startswith("libm.so.6:")  # everything else: forwarded
    assert got["gpa cuMemAlloc"] == f"{ours}:cuMemAlloc_v2"
    assert got["gpa cuMemAllocAsync"] == f"{ours}:cuMemAllocAsync"
    assert got["gpa cuMemAllocAsync ptsz"] == f"{ours}:cuMemAllocAsync_ptsz"
    assert got["gpa cuMemFreeAsync ptsz"] == f"{ours}:cuMemFreeAsync_ptsz"
    assert got["gpa cuMemGetInfo"] == f"{ours}:cuMemGetInfo_v2"
    assert got["gpa cuInit"] == "libcuda.so.1:cuInit"
    assert got["gpa cuGetProcAddress"] == f"{ours}:cuGetProcAddress_v2"
    # An ABI variant we do not know is never given our wrapper, and the user is told once.
    assert got["gpa cuMemAlloc future"] == "libcuda.so.1:?"  # the static mem_alloc_v9
    assert result.stderr.count("unknown variant of cuMemAlloc") == 1


FIRST_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
int which(void) { return 1; }
/* Asks for the *next* definition of which() after this library: libsecond's. */
int next_which(void) {
    int (*f)(void) = (int (*)(void))dlsym(RTLD_NEXT, "which");
    return f ? f() : -1;
}
"""
SECOND_C = "int which(void) { return 2; }\n"
MAIN_C = r"""
#include <stdio.h>
int next_which(void);
int main(void) { printf("%d\n", next_which()); return 0; }
"""


def test_rtld_next_still_means_the_callers_next_object(native: Native, tmp_path: Path) -> None:
    """The forward to the real dlsym is a tail call, so glibc sees the caller's address."""
    for name, text in (("first.c", FIRST_C), ("second.c", SECOND_C), ("main.c", MAIN_C)):
        (tmp_path / name).write_text(text)
    for lib in ("first", "second"):
        compile_c(
            *STRICT,
            "-O0",
            "-fPIC",
            "-shared",
            "-o",
            str(tmp_path / f"lib{lib}.so"),
            str(tmp_path / f"{lib}.c"),
            "-ldl",
        )
    compile_c(
        *STRICT,
        "-O0",
        "-o",
        str(tmp_path / "main"),
        str(tmp_path / "main.c"),
        f"-L{tmp_path}",
        "-Wl,--no-as-needed",
        "-lfirst",
        "-lsecond",
        "-ldl",
    )
    for preload in ("", str(native.library)):
        result = subprocess.run(
            [str(tmp_path / "main")],
            env={"LD_LIBRARY_PATH": str(tmp_path), "LD_PRELOAD": preload},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout.strip() == "2", (preload, result.stderr)


# --------------------------------------------------------- a broken accounting file
def test_an_unusable_accounting_file_falls_back_and_says_so_once(
    native: Native, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.cap"
    bad.write_bytes(b"not a cap file" * 1000)
    env = native.capped(bad)
    result = subprocess.run(
        [str(native.client), "dlsym", f"fill:{GIB}", "info", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stderr.count("allocation-time cap unavailable") == 1
    assert f"fill {FAKE_TOTAL} 2" in result.stdout  # today's behaviour: the sampler's job


def test_reading_a_file_that_is_not_ours_gives_none(tmp_path: Path) -> None:
    (tmp_path / "x.cap").write_bytes(bytes(alloccap.FILE_BYTES))
    assert alloccap.read_file(tmp_path / "x.cap") is None
    assert alloccap.read_file(tmp_path / "missing.cap") is None


def changes_of(path: Path, pid: int) -> int:
    return next(s.changes for s in state(path).slots if s.pid == pid)


def test_the_daemon_raises_a_process_overhead_to_what_nvml_sees(
    native: Native, cap_file: Path
) -> None:
    member = subprocess.Popen(
        [str(native.client), "dlsym", f"alloc:{GIB}", "hold"],
        env=native.capped(cap_file),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert member.stdout is not None
        assert member.stdout.readline().split() == ["alloc", "0"]
        before = state(cap_file).used_bytes
        assert before == GIB + reserve_of(LIMIT)
        changes = changes_of(cap_file, member.pid)  # what the daemon reads before NVML
        # NVML sees less than counted + reserve: nothing changes (never lowered).
        assert alloccap.raise_overhead(cap_file, member.pid, GIB + 100 * MIB, changes) == 0
        # NVML sees 900 MiB beyond the allocations: the slot is charged the difference.
        assert alloccap.raise_overhead(cap_file, member.pid, GIB + 900 * MIB, changes) == (
            900 * MIB - reserve_of(LIMIT)
        )
        assert state(cap_file).used_bytes == GIB + 900 * MIB
        assert alloccap.raise_overhead(cap_file, 1, GIB, changes) == -1  # not a member
    finally:
        assert member.stdin is not None
        member.stdin.close()
        member.wait(timeout=30)
    assert state(cap_file).used_bytes == 0  # the raised overhead left with the process


def test_a_free_between_the_nvml_sample_and_the_correction_is_not_overhead(
    native: Native, cap_file: Path
) -> None:
    """NVML sampled while 8 GiB were held, then the process freed them: no 8 GiB 'overhead'."""
    member = subprocess.Popen(
        [str(native.client), "dlsym", f"fill:{CHUNK}", "wait", "freeall", "hold"],
        env=native.capped(cap_file),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert member.stdin is not None and member.stdout is not None
        filled = int(member.stdout.readline().split()[1])
        assert member.stdout.readline().split() == ["wait"]
        changes = changes_of(cap_file, member.pid)  # the daemon, before sampling NVML
        nvml_saw = filled + 600 * MIB  # NVML: everything held, plus the context
        member.stdin.write("\n")
        member.stdin.flush()
        assert member.stdout.readline().split() == ["freeall", "0"]
        assert member.stdout.readline().split() == ["hold"]
        assert alloccap.raise_overhead(cap_file, member.pid, nvml_saw, changes) == alloccap.MOVED
        assert state(cap_file).used_bytes == reserve_of(LIMIT)  # the reserve alone, as before
    finally:
        assert member.stdin is not None
        member.stdin.close()
        member.wait(timeout=30)


@pytest.mark.parametrize("mode", ["direct", "gpa-ptsz"])
def test_a_pool_that_grows_past_the_share_is_undone_and_refused(
    native: Native, cap_file: Path, mode: str
) -> None:
    """The driver grows pools by its own granularity (here 512 MiB for a 2 MiB request),
    more than the library's estimate: the growth that would pass the share is given back."""
    growth = 512 * MIB
    env = {**native.capped(cap_file), "FAKE_CUDA_POOL_GROWTH": str(growth)}
    out = native.run(env, mode, f"asyncfill:{2 * MIB}", "used", "info")
    total, error = (int(w) for w in words(out, "fill")[1:])
    held = alloccap.allocatable(LIMIT) // growth * growth  # whole growths that fit
    assert error == 2
    assert total == held  # every 2 MiB block of the growths that fit, and not one more
    assert int(words(out, "used")[1]) == held  # the device holds no more than the share
    assert int(words(out, "used")[1]) + reserve_of(LIMIT) <= LIMIT - alloccap.partition_margin(
        LIMIT
    )
    assert int(words(out, "info")[2]) == alloccap.allocatable(LIMIT) - held
    assert state(cap_file).refused >= 1


def test_the_sampler_corrects_only_processes_it_read_before_sampling(
    native: Native, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """before_sample / after_sample, as chronosd calls them around each NVML sample."""
    monkeypatch.setenv("CHRONOS_HOME", str(tmp_path))
    monkeypatch.setenv("CHRONOS_SOCKET", str(tmp_path / "chronosd.sock"))  # guard file here
    record = PartitionRecord(
        "p1", 0, "GPU-0", FAKE_TOTAL, LIMIT, os.getuid(), "me", 0.0, 0.0, 1e12, "active"
    )
    created = alloccap.on_create(record, "embedded")
    assert created is not None
    (path,) = created
    member = subprocess.Popen(
        [str(native.client), "dlsym", f"alloc:{GIB}", "hold"],
        env=native.capped(path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert member.stdout is not None
        assert member.stdout.readline().split() == ["alloc", "0"]
        seen = [ProcessUse(member.pid, 0, GIB + 900 * MIB, "me", "cap_client", "p1")]
        # No snapshot (the process was not read before NVML was): no correction.
        assert alloccap.after_sample([record], seen, None, mode="embedded") == []
        snapshot = alloccap.before_sample([record], mode="embedded")
        assert member.pid in snapshot[("p1", 0)]
        # What it holds on another GPU is not this partition's (its file counts GPU 0).
        elsewhere = [ProcessUse(member.pid, 1, GIB + 900 * MIB, "me", "cap_client", "p1")]
        assert alloccap.after_sample([record], elsewhere, snapshot, mode="embedded") == []
        raised = alloccap.after_sample([record], seen, snapshot, mode="embedded")
        assert raised == [("p1", member.pid, 900 * MIB - reserve_of(LIMIT))]
        assert state(path).used_bytes == GIB + 900 * MIB
    finally:
        assert member.stdin is not None
        member.stdin.close()
        member.wait(timeout=30)
