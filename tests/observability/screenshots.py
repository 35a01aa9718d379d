"""Make the README's dashboard screenshots: ``python tests/observability/screenshots.py``.

Starts a chronosd on simulated GPUs with a small, realistic scene (three users,
active partitions with processes, a booking, a queued request, a process
outside any partition), serves the dashboard from the daemon and saves
``docs/images/dashboard.png`` (laptop) and ``docs/images/dashboard-phone.png``.

Run as root to show other users: it creates the accounts alice, bob and carol
when they are missing and removes those it created at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from chronos_testing import unix_accounts  # noqa: E402
from support import CHROMIUM, CHROMIUM_ARGS, GIB, ROOT, Daemon, wait_for  # noqa: E402

USERS = ("alice", "bob", "carol")
OUT = ROOT / "docs" / "images"


def as_user(name: str) -> list[str]:
    entry = pwd.getpwnam(name)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]


def job(
    daemon: Daemon, user: str, partition: str, device: int, used: int, script: str, *args: str
) -> None:
    """A process of ``user`` in ``partition`` holding ``used`` bytes, running ``script``."""
    bin_dir = daemon.base / "bin"
    bin_dir.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (bin_dir / "python3").symlink_to(sys.executable)
    (daemon.base / script).write_text("import time\ntime.sleep(3600)\n")
    os.chmod(daemon.base / script, 0o644)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if partition:
        env["CHRONOS_PARTITION_ID"] = partition
    proc = daemon.spawn(
        [*as_user(user), "python3", script, *args],
        env=env,
        cwd=daemon.base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from chronos.devices.simulated import declare_process

    os.environ["CHRONOS_HOME"] = str(daemon.base)
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().count(b"\0") > 1, 5)
    declare_process(proc.pid, device, used)


def scene(daemon: Daemon) -> None:
    def create(user: str, *args: str) -> str:
        return str(daemon.cli_json("create", *args, "--user", user)["id"])

    a = create("alice", "0", "40%", "3h")
    b = create("bob", "0", "25%", "1h30m")
    c = create("carol", "1", "30%", "45m")
    create("bob", "1", "50%", "4h", "--start", "+3h")
    create("alice", "1", "25%", "2h", "--start", "+8h")
    job(daemon, "alice", a, 0, 27 * GIB, "train.py", "--model", "llama-7b", "--epochs", "3")
    job(daemon, "bob", b, 0, 18 * GIB, "finetune.py", "--lora", "--batch", "16")
    job(daemon, "carol", c, 1, 9 * GIB, "notebook_kernel.py")
    job(daemon, "bob", "", 0, 4 * GIB, "eval.py", "--quick")
    waiter = daemon.spawn(
        [
            *as_user("carol"),
            sys.executable,
            "-m",
            "chronos.cli",
            "create",
            "0",
            "45%",
            "2h",
            "--wait",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: daemon.cli_json("queue") or waiter.poll() is not None, 10, what="queue")
    time.sleep(1.0)  # a sample or two of the declared memory


def shoot(url: str) -> None:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for name, viewport, scale in (
            ("dashboard.png", (1280, 800), 1),
            ("dashboard-phone.png", (390, 844), 2),
        ):
            page = browser.new_page(
                viewport={"width": viewport[0], "height": viewport[1]},
                device_scale_factor=scale,
                color_scheme="light",
            )
            page.goto(url)
            page.wait_for_selector("#partitions tbody tr[data-partition-id]")
            page.wait_for_timeout(1800)
            page.screenshot(path=str(OUT / name), full_page=True)
            page.close()
        browser.close()


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (it creates the demo accounts)", file=sys.stderr)
        return 2
    with unix_accounts(*USERS):
        daemon = Daemon('dashboard_address = "127.0.0.1:0"\nsample_interval = "0.2s"\n')
        try:
            daemon.start()
            scene(daemon)
            url = "http://" + daemon.address_of("dashboard_serving") + "/"
            shoot(url)
        finally:
            daemon.cleanup()
    print(f"wrote {OUT / 'dashboard.png'} and {OUT / 'dashboard-phone.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
