"""``chronosd`` / ``chronos daemon``: start the per-machine authority.

Start-up order matters for crash safety: take the state directory's lock
(so a second daemon refuses), lock the ledger down to the daemon's user,
process everything that fell due while no daemon ran, and only then accept
clients and tell systemd we are ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from chronos.cgroups import PartitionCgroups
from chronos.config import Config, load_config
from chronos.daemon.deadlines import Deadlines
from chronos.daemon.log import log
from chronos.daemon.notify import sd_notify
from chronos.daemon.sampler import Sampler
from chronos.daemon.server import Broadcast, Server
from chronos.errors import ChronosError
from chronos.ledger import Ledger
from chronos.paths import LEDGER_FILE, SYSTEM_STATE_DIR, socket_path
from chronos.service import Service
from chronos.slurm.reconcile import start_slurm

LOCK_FILE = "chronosd.lock"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chronosd", description="The Chronos daemon: one authority per machine."
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help="Unix socket to listen on (default $CHRONOS_SOCKET or /run/chronos/chronosd.sock).",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="Ledger directory (default $CHRONOS_HOME or /var/lib/chronos).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="Policy file (default $CHRONOS_CONFIG or /etc/chronos/config.toml).",
    )
    parser.add_argument(
        "--metrics",
        metavar="ADDRESS",
        help="Serve Prometheus metrics on HOST:PORT (overrides metrics_address; e.g. "
        "127.0.0.1:9464).",
    )
    parser.add_argument(
        "--dashboard",
        metavar="ADDRESS",
        help="Serve the read-only web dashboard on HOST:PORT (overrides dashboard_address).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state_dir = args.state_dir or Path(os.environ.get("CHRONOS_HOME") or SYSTEM_STATE_DIR)
    if args.socket is None and not os.environ.get("CHRONOS_SOCKET") and args.state_dir:
        os.environ["CHRONOS_HOME"] = str(state_dir)
    sock_path = args.socket or socket_path()
    try:
        return asyncio.run(
            Daemon(state_dir, sock_path, args.config, args.metrics, args.dashboard).run()
        )
    except ChronosError as exc:
        print(f"chronosd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


class Daemon:
    def __init__(
        self,
        state_dir: Path,
        sock_path: Path,
        config_path: Path | None,
        metrics_address: str | None = None,
        dashboard_address: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.metrics_address = metrics_address
        self.dashboard_address = dashboard_address
        self.sock_path = sock_path
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self._lock_fd: int | None = None
        self._stop = asyncio.Event()
        self.broadcast = Broadcast()
        self._busy = self._dirty = False

    async def run(self) -> int:
        self._prepare_state_dir()
        self._take_lock()
        ledger = Ledger(self.state_dir / LEDGER_FILE, file_mode=0o644)
        self._lock_down(self.state_dir / LEDGER_FILE)
        ledger.reap_owners = False  # owner deaths come from pidfds (Deadlines), not /proc scans
        service = Service(ledger, self.config, "daemon")
        service.cgroups = PartitionCgroups.detect()
        service.machine  # noqa: B018 - open the GPU backends now, not on the first request
        deadlines = Deadlines(ledger, lambda: self.config.grace_s)
        self.service, self.deadlines = service, deadlines
        service.on_change = self._changed
        deadlines.after_time = self._changed
        deadlines.resume_kills()  # SIGKILLs a previous daemon scheduled but did not send
        self._changed()  # expiries that fell due while no daemon ran

        sampler = Sampler(service, deadlines, lambda: self.config)
        deadlines.on_ended = sampler.on_ended
        sampling = asyncio.create_task(sampler.run())
        following = start_slurm(service, lambda: self.config, self._changed)  # docs/SLURM.md
        server = Server(service.handle, lambda: self.config.admin_group, self.broadcast)
        listener = await self._listen(server)
        endpoints = self._start_http(service, sampler, server)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._reload(service, sampler))
        log(
            "started",
            pid=os.getpid(),
            socket=str(self.sock_path),
            state_dir=str(self.state_dir),
            backends=service.machine.backend_names,
            cgroups=str(service.cgroups.base) if service.cgroups.available else "unavailable",
            devices=len(service.machine.devices),
        )
        sd_notify("READY=1")
        try:
            await self._stop.wait()
        finally:
            sd_notify("STOPPING=1")
            sampling.cancel()
            if following is not None:
                following.cancel()
            for endpoint in endpoints:
                endpoint.close()
            listener.close()
            deadlines.close()
            service.close()
            self._remove_socket()
            log("stopped")
        return 0

    def _changed(self) -> None:
        """After any change: act on what fell due, grant waiters, wake long polls."""
        if self._busy:
            self._dirty = True  # a grant changed things again: the loop below goes round
            return
        self._busy = True
        try:
            self._dirty = True
            while self._dirty:
                self._dirty = False
                self.deadlines.changed()
                self.service.grant_waiting()
        finally:
            self._busy = False
        self.broadcast.notify()

    def _start_http(self, service: Service, sampler: Sampler, server: Server) -> list[Any]:
        """Prometheus metrics and the web dashboard, each only where an address is set.

        Imported only then (``prometheus_client`` stays out of every other process);
        one that cannot start is logged, and the daemon runs on without it.
        """
        started: list[Any] = []
        metrics_at = self.metrics_address or self.config.metrics_address
        dashboard_at = self.dashboard_address or self.config.dashboard_address
        try:
            if metrics_at:
                from chronos.metrics import start_metrics

                metrics = start_metrics(
                    metrics_at, service, sampler, server, self.state_dir / LEDGER_FILE
                )
                started.append(metrics)
                log("metrics_serving", address=f"{metrics.host}:{metrics.port}")
                if metrics.warning:
                    log("metrics_exposed", level="warning", message=metrics.warning)
            if dashboard_at:
                from chronos.dashboard.server import start_daemon_dashboard

                dashboard = start_daemon_dashboard(dashboard_at, self.sock_path)
                started.append(dashboard)
                log("dashboard_serving", address=f"{dashboard.host}:{dashboard.port}")
                if dashboard.warning:
                    log("dashboard_exposed", level="warning", message=dashboard.warning)
        except ChronosError as exc:
            log("http_failed", level="error", error=str(exc))
        return started

    def _prepare_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            if os.geteuid() == 0:
                os.chown(self.state_dir, 0, 0)
            os.chmod(self.state_dir, 0o755)
        except OSError as exc:
            raise ChronosError(f"cannot use state directory {self.state_dir}: {exc}") from None

    def _take_lock(self) -> None:
        path = self.state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ChronosError(
                f"another chronosd (pid {holder}) is already running on {self.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _lock_down(self, ledger_path: Path) -> None:
        """The daemon is the only writer: its ledger files are writable by it alone."""
        for suffix in ("", "-wal", "-shm"):
            path = Path(str(ledger_path) + suffix)
            if path.exists():
                if os.geteuid() == 0:
                    os.chown(path, 0, 0)
                os.chmod(path, 0o644)

    async def _listen(self, server: Server) -> asyncio.AbstractServer:
        self.sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # Our state lock does not cover a daemon of another state dir on this socket:
        # taking its socket over would leave its clients on the wrong ledger.
        if self._socket_answers():
            raise ChronosError(
                f"another chronosd is already running on {self.sock_path} (another state dir)"
            )
        self._remove_socket()  # nobody answers: a dead daemon's socket
        listener = await asyncio.start_unix_server(
            server.serve_client, path=str(self.sock_path), backlog=1024
        )
        os.chmod(self.sock_path, 0o666)  # anyone may connect; SO_PEERCRED says who they are
        return listener

    def _socket_answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.sock_path))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()

    def _reload(self, service: Service, sampler: Sampler) -> None:
        try:
            self.config = load_config(self.config_path)
        except ChronosError as exc:
            log("config_rejected", level="error", error=str(exc))
            return
        service.config = self.config
        sampler.reconfigure()
        log("config_reloaded")


if __name__ == "__main__":  # python -m chronos.daemon.main
    sys.exit(main())
