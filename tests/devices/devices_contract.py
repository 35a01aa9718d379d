"""What every backend must satisfy; shared by the stub and the real-GPU tests."""

from __future__ import annotations

from chronos.devices.base import Backend


def check_backend_contract(backend: Backend) -> None:
    devices = backend.devices()
    assert [d.index for d in devices] == list(range(len(devices))), "indices are 0..n-1"
    uuids = [d.uuid for d in devices]
    assert len(set(uuids)) == len(uuids), f"duplicate uuids: {uuids}"
    for device in devices:
        assert device.uuid, "every device has a uuid"
        assert device.name, "every device has a name"
        assert device.total_bytes > 0, f"{device.uuid}: total must be > 0"
        assert device.backend == backend.name
        assert all(isinstance(v, str) for v in device.visible_env.values())
        assert all(isinstance(v, str) for v in device.details.values())

    usage = backend.usage()
    assert sorted(u.uuid for u in usage) == sorted(uuids), "one usage entry per device"
    totals = {d.uuid: d.total_bytes for d in devices}
    for entry in usage:
        total = totals[entry.uuid]
        for figure in (entry.used_bytes, entry.free_bytes):
            assert figure is None or 0 <= figure <= total, f"{entry}: outside 0..{total}"
        if entry.utilization_pct is not None:
            assert 0 <= entry.utilization_pct <= 100

    processes = backend.processes()
    if not backend.per_process_memory:
        assert processes == []
    seen = set()
    for proc in processes:
        assert proc.device_uuid in totals, f"{proc}: unknown device"
        assert proc.pid > 0
        assert proc.used_bytes is None or proc.used_bytes >= 0
        assert (proc.pid, proc.device_uuid) not in seen, f"{proc}: listed twice"
        seen.add((proc.pid, proc.device_uuid))
