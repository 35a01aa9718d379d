"""The allocation-time cap: locate the preload library, and keep its accounting files.

``native/chronos_cap.c`` (built at install into ``native/libchronos_cap.so``) is
preloaded into a partition's processes; they share one counter per (partition, GPU)
in a small memory-mapped file whose layout is ``native/chronos_cap.h`` and which names
its GPU by UUID (the library charges an allocation to the file of the device it lands
on, and refuses one on a GPU outside the partition). This module
creates those files (the daemon as root in a root-owned 0755 directory, owned by
the partition's user with mode 0600; in embedded mode in a private per-user
directory), reads them for ``chronos stats``, lets the daemon correct a process's
overhead from its samples and keep the machine-wide guard file, and builds the
environment that preloads the library.
If the library is missing (no compiler at install) Chronos says so once and
falls back to the sampling hard cap alone. See docs/ALLOCATION_CAP.md.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chronos import paths, procs
from chronos.models import PartitionRecord, ProcessUse
from chronos.vocabulary import Mode

if TYPE_CHECKING:
    from ctypes import CDLL

NATIVE_DIR = Path(__file__).parent / "native"
LIBRARY_NAME = "libchronos_cap.so"
ENV_FILE = "CHRONOS_CAP_FILE"
ENV_SWITCH = "CHRONOS_ALLOC_CAP"
"""``off``: run without the library (the sampling hard cap still applies); ``on``: use
it on any backend (the tests' fake driver runs on the simulated backend)."""
GUARD_FILE = "unpartitioned"
"""Machine-wide mode: per-GPU floors for processes outside any partition."""

# --- the file layout (native/chronos_cap.h) ---------------------------------------
MAGIC = 0x43415043
VERSION = 3
SLOTS = 256
MAX_SHARES = 16
"""GPUs of one partition the library can cap (``CAP_MAX_SHARES``)."""
# magic version limit reserve used slots flags refused margin pad device_uuid
HEADER = struct.Struct("<IIqqqIIqq8x64s")
SLOT = struct.Struct("<QQqqQ")  # pid start_ticks bytes overhead changes
FILE_BYTES = HEADER.size + SLOTS * SLOT.size
RECLAIMING = (1 << 64) - 1

DEFAULT_RESERVE = 704 << 20
"""Charged per process at its first device call: CUDA context and modules, which no
allocation hook sees (518-682 MiB measured on an H200), so a process that fills to
the cap stays under the sampler's hard cap too."""


DEFAULT_MARGIN = 256 << 20
"""Kept free below the partition's bytes, whatever its processes: memory the driver
takes on its own once a program has filled its share (kernels loaded lazily at their
first launch, a stream-ordered pool's rounding), which the sampler counts."""


def process_reserve(partition_bytes: int) -> int:
    """The per-process reserve, at most a quarter of a small partition."""
    return min(DEFAULT_RESERVE, partition_bytes // 4)


def partition_margin(partition_bytes: int) -> int:
    """The partition's margin, at most a sixteenth of a small partition."""
    return min(DEFAULT_MARGIN, partition_bytes // 16)


def allocatable(partition_bytes: int, processes: int = 1) -> int:
    """What ``processes`` processes of a partition may allocate together (the library's cap)."""
    return (
        partition_bytes
        - partition_margin(partition_bytes)
        - processes * process_reserve(partition_bytes)
    )


@dataclass(frozen=True)
class Slot:
    pid: int
    start_ticks: int
    bytes: int
    overhead: int
    changes: int


@dataclass(frozen=True)
class CapState:
    limit_bytes: int
    reserve_bytes: int
    used_bytes: int
    refused: int
    margin_bytes: int
    slots: tuple[Slot, ...]


# --- where things are ------------------------------------------------------------
_said: set[str] = set()
_NOT_BUILT = (
    "allocation-time cap unavailable (libchronos_cap.so was not built: no C compiler at "
    "install?); the sampling hard cap applies"
)


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"chronos: {message}", file=sys.stderr, flush=True)


def library_path() -> Path | None:
    """The built preload library, or None if it was not built (no compiler at install)."""
    path = NATIVE_DIR / LIBRARY_NAME
    return path if path.is_file() else None


def cap_dir(mode: str) -> Path:
    """Where a partition's accounting file lives.

    Daemon: next to the daemon's socket (``/run/chronos/cap``), made by the daemon,
    root-owned 0755, so no user can create, replace or remove files there. Embedded:
    a directory private to the user (0700).
    """
    if mode == Mode.DAEMON:
        return paths.socket_path().parent / "cap"
    uid = os.getuid()
    home = os.environ.get("CHRONOS_HOME")
    if home:
        return Path(home) / f"cap-{uid}"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "chronos-cap"
    import tempfile

    return Path(tempfile.gettempdir()) / f"chronos-cap-{uid}"


def cap_path(partition_id: str, mode: str, share: int = 0) -> Path:
    """The file of the partition's ``share``-th GPU: ``<id>.cap`` for the primary (as a
    one-GPU partition's always was), ``<id>.<k>.cap`` for the others of a group."""
    return cap_dir(mode) / cap_file_name(partition_id, share)


def cap_file_name(partition_id: str, share: int = 0) -> str:
    suffix = "" if share == 0 else f".{share}"
    return f"{partition_id}{suffix}.cap"


def _names_in(folder: Path) -> set[str]:
    """The files in ``folder`` (none if it is missing): one listing per sample instead of
    an open() per partition and GPU, most of which find no file (not a CUDA GPU)."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def cap_paths(record: PartitionRecord, mode: str) -> list[Path]:
    """One accounting file per GPU of the partition, in share order."""
    return [cap_path(record.id, mode, k) for k in range(len(record.shares))]


def partition_of(file_name: str) -> str | None:
    """The partition id an accounting file's name belongs to (None: not one of ours)."""
    if not file_name.endswith(".cap"):
        return None
    stem = file_name[: -len(".cap")]
    head, dot, share = stem.rpartition(".")
    return head if dot and share.isdigit() else stem


def cuda_uuid(uuid: str) -> str:
    """The UUID the library matches a device by: CUDA's (``GPU-``/``MIG-`` and 32 hex
    digits), else ``""`` (the simulated backend's made-up UUIDs: the file then counts the
    CUDA ordinal of its position, which is right under the CUDA_VISIBLE_DEVICES we set)."""
    prefix, _, digits = uuid.partition("-")
    digits = digits.replace("-", "").lower()
    is_cuda = prefix in ("GPU", "MIG") and len(digits) == 32
    return uuid if is_cuda and all(c in "0123456789abcdef" for c in digits) else ""


def _ensure_dir(path: Path, mode: str) -> None:
    """Make the directory, then insist it is what we expect (not a planted one)."""
    if mode == Mode.DAEMON:
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.path.islink(path):  # cannot be planted in the daemon's root-owned directory
            raise PermissionError(f"{path} is a symbolic link")
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
            os.chmod(path, 0o755)
        return
    with contextlib.suppress(FileExistsError):
        path.mkdir(parents=True, mode=0o700)
    st = os.lstat(path)
    if not (
        os.path.isdir(path)
        and not os.path.islink(path)
        and st.st_uid == os.getuid()
        and st.st_mode & 0o077 == 0
    ):
        raise PermissionError(f"{path} is not a private directory of this user")


# --- the accounting file -----------------------------------------------------------
def create_file(
    path: Path, limit_bytes: int, uid: int | None = None, device_uuid: str = ""
) -> Path:
    """Write a fresh accounting file for one GPU's share of ``limit_bytes`` (atomically).

    ``device_uuid`` names the GPU the file counts (a ``GPU-``/``MIG-`` UUID); empty, the
    file counts the CUDA ordinal of its position among the partition's files.
    """
    reserve = process_reserve(limit_bytes)
    margin = partition_margin(limit_bytes)
    name = device_uuid.encode()[: HEADER.size - 65]  # leave the NUL the library relies on
    header = HEADER.pack(MAGIC, VERSION, limit_bytes, reserve, 0, SLOTS, 0, 0, margin, name)
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".new-", dir=path.parent)
    try:
        os.write(fd, header + bytes(FILE_BYTES - len(header)))
        os.fchmod(fd, 0o600)
        if uid is not None and os.geteuid() == 0:
            os.fchown(fd, uid, -1)
        os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_file(path: Path) -> CapState | None:
    """What the library has counted, or None if the file is missing or not ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_BYTES)
    except OSError:
        return None
    if len(raw) < FILE_BYTES:
        return None
    magic, version, limit, reserve, used, slots, _flags, refused, margin, _uuid = (
        HEADER.unpack_from(raw)
    )
    if magic != MAGIC or version != VERSION or slots != SLOTS:
        return None
    found = []
    for i in range(SLOTS):
        pid, ticks, nbytes, overhead, changes = SLOT.unpack_from(raw, HEADER.size + i * SLOT.size)
        if pid not in (0, RECLAIMING):
            found.append(Slot(pid, ticks, nbytes, overhead, changes))
    return CapState(limit, reserve, used, refused, margin, tuple(found))


def live_bytes(state: CapState) -> int:
    """What the partition's live processes hold: slots of dead processes do not count.

    Read-only on purpose: the library itself gives a dead process's share back
    (with compare-and-swap) the next time a member allocates or starts; Python never
    writes the shared counter (the daemon's correction goes through the library's
    own atomic helper, ``raise_overhead``).
    """
    dead = sum(
        s.bytes + s.overhead
        for s in state.slots
        if s.start_ticks and procs.start_ticks(s.pid) != s.start_ticks
    )
    return max(0, state.used_bytes - dead)


# --- hooks for the service (partition created / ended) ----------------------------
def _switch() -> str:
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    return {"0": "off", "no": "off", "false": "off", "1": "on", "yes": "on"}.get(value, value)


def wanted_for(vendor: str) -> bool:
    """Whether partitions on this vendor's GPUs get an accounting file (CUDA only)."""
    switch = _switch()
    return switch == "on" or (switch != "off" and vendor == "nvidia")


def on_create(record: PartitionRecord, mode: str) -> list[Path] | None:
    """Make the partition's accounting files, one per GPU; None (said once) if impossible."""
    if library_path() is None:
        _say_once(_NOT_BUILT)
        return None
    if len(record.shares) > MAX_SHARES:
        _say_once(f"allocation-time cap covers at most {MAX_SHARES} GPUs of one partition")
        return None
    try:
        directory = cap_dir(mode)
        _ensure_dir(directory, mode)
        return [
            create_file(path, share.memory_bytes, record.uid, cuda_uuid(share.device_uuid))
            for path, share in zip(cap_paths(record, mode), record.shares, strict=True)
        ]
    except OSError as exc:
        _say_once(f"allocation-time cap unavailable ({exc}); the sampling hard cap applies")
        return None


def on_release(record: PartitionRecord, mode: str) -> None:
    """Remove every accounting file of the partition (the primary's and a group's others):
    one unlink per share, by name (as ``on_create`` named them), no listing."""
    for path in cap_paths(record, mode):
        with contextlib.suppress(OSError):
            os.unlink(path)


def sweep(is_open: Callable[[str], bool], mode: str) -> None:
    """Remove accounting files of partitions that are no longer open (e.g. expired).

    Looks only at the files there (a few), never at the whole ledger: one listing, as
    plain strings (every create comes here).
    """
    folder = os.fspath(cap_dir(mode))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        owner = partition_of(name)
        if owner is not None and not is_open(owner):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def counted_bytes(partition_id: str, mode: str) -> int | None:
    """Bytes the library counts for a partition's primary GPU now (None: no library file)."""
    state = read_file(cap_path(partition_id, mode))
    return None if state is None else live_bytes(state)


def _bytes_by_share(found: Iterable[ProcessUse]) -> dict[tuple[str, int], int]:
    """What the backends (NVML) see each partition's processes hold, per GPU."""
    seen: dict[tuple[str, int], int] = {}
    for proc in found:
        if proc.partition_id is not None:
            key = (proc.partition_id, proc.device)
            seen[key] = seen.get(key, 0) + (proc.used_bytes or 0)
    return seen


def stats_rows(
    records: Iterable[PartitionRecord], found: Iterable[ProcessUse], mode: str
) -> list[dict[str, object]]:
    """Per open partition and GPU: bytes the library counts, bytes NVML sees (``stats``).

    One row per share, so a group shows each GPU's count against that GPU's share.
    """
    seen = _bytes_by_share(found)
    rows: list[dict[str, object]] = []
    for r in records:
        for k, share in enumerate(r.shares):
            state = read_file(cap_path(r.id, mode, k))
            rows.append(
                {
                    "partition_id": r.id,
                    "user": r.user,
                    "device": share.device,
                    "memory_bytes": share.memory_bytes,
                    "counted_bytes": None if state is None else live_bytes(state),
                    "refused": None if state is None else state.refused,
                    "nvml_bytes": seen.get((r.id, share.device), 0),
                }
            )
    return rows


# --- the daemon's corrections from its samples ----------------------------------
_native: CDLL | None = None


def _library_functions() -> CDLL | None:
    """The library loaded into this process privately (RTLD_LOCAL: its dlsym is not used)."""
    global _native
    library = library_path()
    if _native is None and library is not None:
        import ctypes  # only to change an overhead: not for every command that imports us

        _native = ctypes.CDLL(str(library), mode=os.RTLD_LOCAL)
        _native.chronos_cap_raise_overhead.restype = ctypes.c_longlong
        _native.chronos_cap_raise_overhead.argtypes = [
            ctypes.c_char_p,
            ctypes.c_longlong,
            ctypes.c_ulonglong,
            ctypes.c_longlong,
            ctypes.c_ulonglong,
        ]
    return _native


MOVED = -2
"""``raise_overhead``: the process allocated or freed around the sample; nothing changed."""


def raise_overhead(path: Path, pid: int, seen_bytes: int, changes: int) -> int:
    """Charge ``pid`` for what NVML sees beyond what its slot counted (never less).

    ``changes`` is the slot's change counter read *before* NVML was sampled: the
    correction is made only if the slot did not move since, so NVML's figure and the
    slot's describe the same moment. Returns the bytes added (0: nothing to do, -1: no
    such file or slot, ``MOVED``: the slot changed around the sample).
    """
    native = _library_functions()
    ticks = procs.start_ticks(pid)
    if native is None or ticks is None:
        return -1
    return int(
        native.chronos_cap_raise_overhead(str(path).encode(), pid, ticks, seen_bytes, changes)
    )


Snapshot = dict[tuple[str, int], dict[int, int]]
"""Per capped (partition, GPU): pid -> its slot's change counter, read before an NVML sample."""


def before_sample(records: Iterable[PartitionRecord], mode: str = "daemon") -> Snapshot:
    """The daemon, just before sampling NVML: each capped process's change counter.

    Never raises (an empty snapshot only skips this round's corrections).
    """
    snapshot: Snapshot = {}
    try:
        folder = cap_dir(mode)
        present = _names_in(folder)
        for r in records if present else ():
            for k, share in enumerate(r.shares):
                name = cap_file_name(r.id, k)
                state = read_file(folder / name) if name in present else None
                if state is not None:
                    snapshot[(r.id, share.device)] = {s.pid: s.changes for s in state.slots}
    except Exception as exc:  # noqa: BLE001 - a side job of the sampler, never its end
        _say_once(f"allocation-time cap bookkeeping failed: {exc!r}")
    return snapshot


def after_sample(
    records: Iterable[PartitionRecord],
    found: Iterable[ProcessUse],
    snapshot: Snapshot | None = None,
    mode: str = "daemon",
) -> list[tuple[str, int, int]]:
    """The daemon, after each sample: correct per-process overheads, keep the guard file.

    Only processes in ``snapshot`` (from :func:`before_sample`) are corrected, each GPU's
    figure in that GPU's file (memory on a GPU outside the partition is in no file), and
    only if their slot did not change around the sample. Returns the corrections made
    (partition id, pid, bytes added), for the daemon's log. Never raises: the hard
    cap's sampling must go on whatever happens here.
    """
    raised: list[tuple[str, int, int]] = []
    try:
        records, found = list(records), list(found)
        folder = cap_dir(mode)
        share_of = {  # (partition, GPU) -> the share's position: its file's name
            (r.id, share.device): k for r in records for k, share in enumerate(r.shares)
        }
        for proc in found:
            pid_id = proc.partition_id
            key = (pid_id or "", proc.device)
            seen = (snapshot or {}).get(key, {})
            if pid_id is None or proc.pid not in seen or not proc.used_bytes:
                continue
            if key not in share_of:
                continue  # held on a GPU outside the partition: in none of its files
            path = folder / cap_file_name(pid_id, share_of[key])
            added = raise_overhead(path, proc.pid, proc.used_bytes, seen[proc.pid])
            if added > 0:
                raised.append((pid_id, proc.pid, added))
        update_guard(records, found)
    except Exception as exc:  # noqa: BLE001 - a side job of the sampler, never its end
        _say_once(f"allocation-time cap bookkeeping failed: {exc!r}")
    return raised


# --- the environment that preloads the library -------------------------------------
def active_files(record: PartitionRecord, mode: str) -> list[Path] | None:
    """The partition's accounting files (one per GPU) if the library can cap it, else None.

    All or nothing: a group with one file missing is not capped at allocation time.
    """
    paths_ = [active_for(record.id, mode, k) for k in range(len(record.shares))]
    found = [p for p in paths_ if p is not None]
    return found if found and len(found) == len(paths_) else None


def active_for(partition_id: str, mode: str, share: int = 0) -> Path | None:
    """The accounting file of the partition's ``share``-th GPU if usable, else None.

    No file means the partition is not capped at allocation time (not a CUDA GPU,
    ``CHRONOS_ALLOC_CAP=off``, or the library was not built, said once at creation).
    """
    if _switch() == "off":
        return None
    path = cap_path(partition_id, mode, share)
    try:
        st = path.stat()
    except OSError:
        return None
    if library_path() is None:
        _say_once(_NOT_BUILT)
        return None
    if not os.access(path, os.R_OK | os.W_OK) or st.st_size < FILE_BYTES:
        _say_once(f"allocation-time cap unavailable ({path} is not usable)")
        return None
    return path


def preload_env(
    files: Path | Sequence[Path], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """LD_PRELOAD (ours first, the caller's kept) and the accounting files' paths.

    ``CHRONOS_CAP_FILE`` holds one path per GPU of the partition, ``:``-separated, in
    share order (a one-GPU partition's is its one path, as before).
    """
    library = library_path()
    assert library is not None
    current = (os.environ if base is None else base).get("LD_PRELOAD", "")
    rest = [p for p in current.replace(":", " ").split() if p and p != str(library)]
    listed = [files] if isinstance(files, Path) else list(files)
    return {
        "LD_PRELOAD": " ".join([str(library), *rest]),
        ENV_FILE: ":".join(str(f) for f in listed),
    }


# --- machine-wide mode (administrators) --------------------------------------------
def guard_path() -> Path:
    return cap_dir("daemon") / GUARD_FILE


def guard_floors(records: Iterable[PartitionRecord], found: Iterable[ProcessUse]) -> dict[str, int]:
    """Per GPU uuid: memory reserved by active partitions and not in use by them now.

    Processes outside any partition (machine-wide mode) must leave that much free.
    """
    used = _bytes_by_share(found)
    floors: dict[str, int] = {}
    for r in records:
        for share in r.shares:
            unused = max(0, share.memory_bytes - used.get((r.id, share.device), 0))
            floors[share.device_uuid] = floors.get(share.device_uuid, 0) + unused
    return floors


_last_guard: dict[str, int] | None = None


def update_guard(records: Iterable[PartitionRecord], found: Iterable[ProcessUse]) -> None:
    """The daemon, after each sample: keep the guard file current (written when it changes).

    The file is read only by processes that load the library machine-wide; without
    that option it is an unused 0644 file of a few lines.
    """
    global _last_guard
    if os.geteuid() != 0 or library_path() is None:
        return
    floors = guard_floors(records, found)
    if floors == _last_guard:
        return
    try:
        _ensure_dir(cap_dir("daemon"), "daemon")
        write_guard(floors)
        _last_guard = floors
    except OSError as exc:
        _say_once(f"cannot write the machine-wide guard file: {exc}")


def write_guard(floors: Mapping[str, int], path: Path | None = None) -> None:
    """Write the per-GPU floors (``uuid bytes`` lines) that unpartitioned processes keep."""
    target = path or guard_path()
    text = "".join(f"{uuid} {max(0, int(b))}\n" for uuid, b in sorted(floors.items()))
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".guard-", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, target)


def enable_machine_wide(preload_file: Path = Path("/etc/ld.so.preload")) -> str:
    """Add the library to ``preload_file`` (idempotent); return what was done."""
    library = library_path()
    if library is None:
        raise FileNotFoundError("libchronos_cap.so was not built; nothing to preload")
    lines = preload_file.read_text().split() if preload_file.exists() else []
    if str(library) in lines:
        return f"{library} is already in {preload_file}"
    with open(preload_file, "a") as f:
        f.write(f"{library}\n")
    return f"added {library} to {preload_file}"


def disable_machine_wide(preload_file: Path = Path("/etc/ld.so.preload")) -> str:
    library = library_path()
    if not preload_file.exists():
        return f"{preload_file} does not exist"
    kept = [
        line
        for line in preload_file.read_text().splitlines()
        if line.strip() and (library is None or line.strip() != str(library))
    ]
    preload_file.write_text("".join(f"{line}\n" for line in kept))
    return f"removed libchronos_cap.so from {preload_file}"


def main(argv: list[str] | None = None) -> int:
    """``python -m chronos.alloccap enable-machine-wide|disable-machine-wide|status``."""
    args = sys.argv[1:] if argv is None else argv
    preload = Path(args[1]) if len(args) > 1 else Path("/etc/ld.so.preload")
    try:
        if args[:1] == ["enable-machine-wide"]:
            print(enable_machine_wide(preload))
        elif args[:1] == ["disable-machine-wide"]:
            print(disable_machine_wide(preload))
        elif args[:1] == ["status"]:
            library = library_path()
            print(f"library: {library or 'not built'}")
        else:
            print(
                "usage: python -m chronos.alloccap "
                "enable-machine-wide|disable-machine-wide|status [PRELOAD_FILE]",
                file=sys.stderr,
            )
            return 2
    except OSError as exc:
        print(f"chronos: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
