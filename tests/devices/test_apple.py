"""AppleBackend with the platform check and sysctl mocked."""

from __future__ import annotations

import pytest

from chronos.devices import apple
from chronos.devices.apple import AppleBackend
from chronos.errors import DeviceError

SYSCTL = {"hw.memsize": "68719476736", "machdep.cpu.brand_string": "Apple M2 Max"}


@pytest.fixture
def mac(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = dict(SYSCTL)
    monkeypatch.setattr(apple, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(apple, "sysctl", values.get)
    return values


def test_one_unified_memory_device(mac: dict[str, str]) -> None:
    backend = AppleBackend()
    (device,) = backend.devices()
    assert device.name == "Apple M2 Max"
    assert device.vendor == "apple"
    assert device.total_bytes == 64 * 1024**3
    assert device.uuid == apple.APPLE_UUID
    assert backend.per_process_memory is False
    assert backend.processes() == []
    (usage,) = backend.usage()
    assert (usage.uuid, usage.used_bytes, usage.free_bytes) == (device.uuid, None, None)


def test_unknown_chip_name(mac: dict[str, str]) -> None:
    del mac["machdep.cpu.brand_string"]
    assert AppleBackend().devices()[0].name == "Apple Silicon GPU"


def test_unreadable_memsize(mac: dict[str, str]) -> None:
    mac["hw.memsize"] = "oops"
    with pytest.raises(DeviceError, match="hw.memsize"):
        AppleBackend().devices()


@pytest.mark.parametrize(("system", "machine"), [("linux", "x86_64"), ("darwin", "x86_64")])
def test_elsewhere(monkeypatch: pytest.MonkeyPatch, system: str, machine: str) -> None:
    monkeypatch.setattr(apple.sys, "platform", system)
    monkeypatch.setattr(apple.platform, "machine", lambda: machine)
    backend = AppleBackend()  # constructing never fails
    with pytest.raises(DeviceError, match="not an Apple Silicon Mac"):
        backend.devices()
    assert backend.usage() == []
    assert backend.processes() == []


def test_sysctl_absent_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apple, "SYSCTL", "/nonexistent/sysctl")
    assert apple.sysctl("hw.memsize") is None
