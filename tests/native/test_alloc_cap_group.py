"""The allocation-time cap of a partition of several GPUs, on a fake driver with several.

Each GPU of a group has its own accounting file naming it by UUID; the library charges
an allocation to the file of the device it lands on (the current context's), refuses
one past that GPU's share, and refuses any allocation on a GPU outside the group,
whatever order or form ``CUDA_VISIBLE_DEVICES`` gave the devices (the fake driver's
``FAKE_CUDA_VISIBLE`` plays that part: ordinal k is physical device ``visible[k]``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import group_of

from chronos import alloccap
from chronos.models import PartitionRecord, Share

from .conftest import CHUNK, GIB, MIB, Native, allowed, reserve_of

SMALL, LARGE = 2 * GIB, 4 * GIB
OUT_OF_MEMORY = "2"


def fake_uuid(physical: int) -> str:
    """What the fake driver reports for physical device ``physical`` (fake_cuda.c)."""
    return f"GPU-1{physical:x}111213-1415-1617-1819-1a1b1c1d1e1f"


def words(lines: list[list[str]], name: str, nth: int = 0) -> list[str]:
    return [line for line in lines if line[0] == name][nth]


def state(path: Path) -> alloccap.CapState:
    got = alloccap.read_file(path)
    assert got is not None
    return got


def group_files(tmp_path: Path, *shares: tuple[str, int]) -> list[Path]:
    """One accounting file per (uuid, bytes), in share order."""
    return [
        alloccap.create_file(tmp_path / f"g.{k}.cap", nbytes, device_uuid=uuid)
        for k, (uuid, nbytes) in enumerate(shares)
    ]


def env(
    native: Native, files: list[Path], devices: int, visible: str | None = None
) -> dict[str, str]:
    extra = {"FAKE_CUDA_DEVICES": str(devices)}
    if visible is not None:
        extra["FAKE_CUDA_VISIBLE"] = visible
    return {**native.env(**extra), **alloccap.preload_env(files, base={})}


@pytest.mark.parametrize("mode", ["direct", "dlsym", "gpa"])
def test_each_gpu_of_a_group_stops_at_its_own_share(
    native: Native, tmp_path: Path, mode: str
) -> None:
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    out = native.run(
        env(native, files, devices=2),
        mode,
        "device:0",
        f"fill:{CHUNK}",
        "info",
        "devtotal",
        "device:1",
        f"fill:{CHUNK}",
        "info",
    )
    assert words(out, "fill", 0)[1:] == [str(allowed(SMALL)), OUT_OF_MEMORY]
    assert words(out, "fill", 1)[1:] == [str(allowed(LARGE)), OUT_OF_MEMORY]
    assert words(out, "info", 0)[3] == str(SMALL)  # each GPU reports its own share
    assert words(out, "info", 1)[3] == str(LARGE)
    assert words(out, "devtotal")[2] == str(SMALL)
    assert state(files[0]).refused == 1 and state(files[1]).refused == 1
    # The process exited: each GPU's file got back what it had counted there.
    assert state(files[0]).used_bytes == 0 and state(files[1]).used_bytes == 0


def test_a_gpu_outside_the_group_gives_the_process_nothing(native: Native, tmp_path: Path) -> None:
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    out = native.run(
        env(native, files, devices=3),
        "dlsym",
        "device:2",
        f"alloc:{MIB}",
        f"fill:{CHUNK}",
        "info",
        "used",
    )
    assert words(out, "alloc")[1] == OUT_OF_MEMORY
    assert words(out, "fill")[1:] == ["0", OUT_OF_MEMORY]
    assert words(out, "info")[2] == "0"  # no free memory to see there
    assert words(out, "used")[1] == "0"  # the device itself was never asked
    # Refusals elsewhere are counted in the primary's file.
    assert state(files[0]).refused == 2 and state(files[1]).refused == 0


def test_vmm_is_charged_to_the_gpu_it_names_not_the_current_one(
    native: Native, tmp_path: Path
) -> None:
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    out = native.run(
        env(native, files, devices=3),
        "direct",
        "device:0",
        f"vmmon:1:{GIB}",
        f"vmmon:2:{MIB}",
        "vmmunmap",
        "vmmrelease",
        f"vmmon:1:{GIB}",
        f"vmmon:1:{3 * GIB}",  # with the 1 GiB held, past GPU 1's 4 GiB share
        f"vmmon:0:{GIB}",  # GPU 0's share is untouched by all that
    )
    assert [w[1] for w in out if w[0] == "vmmon"] == ["0", OUT_OF_MEMORY, "0", OUT_OF_MEMORY, "0"]
    assert state(files[1]).refused == 1  # the one past its share
    assert state(files[0]).refused == 1  # the one on GPU 2, outside the group


def test_the_uuid_finds_the_share_whatever_the_visible_order(
    native: Native, tmp_path: Path
) -> None:
    """CUDA_VISIBLE_DEVICES=1,0: ordinal 0 is the second GPU of the group."""
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    out = native.run(
        env(native, files, devices=2, visible="1,0"),
        "gpa",
        "device:0",
        f"fill:{CHUNK}",
        "device:1",
        f"fill:{CHUNK}",
    )
    assert words(out, "fill", 0)[1] == str(allowed(LARGE))
    assert words(out, "fill", 1)[1] == str(allowed(SMALL))


def test_a_reordered_visible_list_with_a_stranger_refuses_it(
    native: Native, tmp_path: Path
) -> None:
    """Visible 2,1: ordinal 0 is a GPU outside the group, ordinal 1 is its second."""
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    out = native.run(
        env(native, files, devices=3, visible="2,1"),
        "dlsym",
        "device:0",
        f"alloc:{MIB}",
        "device:1",
        f"fill:{CHUNK}",
    )
    assert words(out, "alloc")[1] == OUT_OF_MEMORY
    assert words(out, "fill")[1] == str(allowed(LARGE))


def test_frees_go_back_to_the_gpu_they_were_charged_to(native: Native, tmp_path: Path) -> None:
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    ops = ["device:0", f"alloc:{GIB}", "device:1", f"alloc:{GIB}", f"alloc:{GIB}"]
    # freeall from device 0's context: the driver frees by pointer, whatever is current
    with holding(native, env(native, files, devices=2), *ops, "device:0", "freeall") as lines:
        assert lines[-1] == ["freeall", "0"]
        assert state(files[0]).used_bytes == reserve_of(SMALL)
        assert state(files[1]).used_bytes == reserve_of(LARGE)


@contextlib.contextmanager
def holding(native: Native, environment: dict[str, str], *ops: str) -> Iterator[list[list[str]]]:
    """cap_client running ``ops`` then holding its memory; yields the ops' output lines."""
    member = subprocess.Popen(
        [str(native.client), "dlsym", *ops, "hold"],
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert member.stdout is not None
        lines = [member.stdout.readline().split() for _ in ops]
        assert member.stdout.readline().split() == ["hold"]
        yield lines
    finally:
        assert member.stdin is not None
        member.stdin.close()
        member.wait(timeout=30)


def test_a_process_pays_the_reserve_only_on_the_gpus_it_touches(
    native: Native, tmp_path: Path
) -> None:
    files = group_files(tmp_path, (fake_uuid(0), SMALL), (fake_uuid(1), LARGE))
    with holding(native, env(native, files, devices=2), "device:1", f"alloc:{MIB}") as lines:
        assert lines == [["device", "0"], ["alloc", "0"]]
        assert state(files[0]).slots == ()  # a rank on GPU 1 costs GPU 0 nothing
        (slot,) = state(files[1]).slots
        assert slot.bytes == MIB and slot.overhead == reserve_of(LARGE)


def test_files_without_uuids_count_the_ordinal_of_their_position(
    native: Native, tmp_path: Path
) -> None:
    """The simulated backend has no CUDA UUIDs: file k counts ordinal k."""
    files = group_files(tmp_path, ("", SMALL), ("", LARGE))
    out = native.run(
        env(native, files, devices=3),
        "dlsym",
        "device:1",
        f"fill:{CHUNK}",
        "device:2",
        f"alloc:{MIB}",
    )
    assert words(out, "fill")[1] == str(allowed(LARGE))
    assert words(out, "alloc")[1] == OUT_OF_MEMORY


def test_a_group_with_a_file_missing_is_not_capped_on_any_gpu(
    native: Native, tmp_path: Path
) -> None:
    """All or nothing, as the sampler's hard cap still holds every GPU."""
    (present,) = group_files(tmp_path, (fake_uuid(0), SMALL))
    files = [present, tmp_path / "missing.cap"]
    result = native.run(
        {**env(native, files, devices=2), "CHRONOS_CAP_QUIET": "1"},
        "dlsym",
        f"alloc:{LARGE}",
    )
    assert words(result, "alloc")[1] == "0"  # over the small share, yet not refused
    assert state(present).used_bytes == 0


def test_the_service_side_files_follow_the_records_shares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_create / active_files / preload_env / sweep for a two-GPU record (test seam)."""
    monkeypatch.setenv("CHRONOS_HOME", str(tmp_path))
    monkeypatch.setenv(alloccap.ENV_SWITCH, "on")
    primary = PartitionRecord(
        "ab12cd34", 0, fake_uuid(0), 80 * GIB, SMALL, os.getuid(), "me", 0.0, 0.0, 1e12, "active"
    )
    group = group_of(primary, Share(1, "SIM-00000001-0000-4000-8000-chronos00001", LARGE, 80 * GIB))
    created = alloccap.on_create(group, "embedded")
    assert created is not None and [p.name for p in created] == ["ab12cd34.cap", "ab12cd34.1.cap"]
    assert alloccap.active_files(group, "embedded") == created
    assert alloccap.preload_env(created, base={})[alloccap.ENV_FILE] == ":".join(map(str, created))
    raw = [p.read_bytes()[: alloccap.HEADER.size] for p in created]
    uuids = [alloccap.HEADER.unpack(r)[-1].rstrip(b"\0").decode() for r in raw]
    assert uuids == [fake_uuid(0), ""]  # a made-up (simulated) UUID: matched by position
    assert [state(p).limit_bytes for p in created] == [SMALL, LARGE]
    alloccap.sweep(lambda pid: pid != "ab12cd34", "embedded")
    assert not any(p.exists() for p in created)
