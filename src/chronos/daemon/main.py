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
import resource
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chronos.cgroups import PartitionCgroups
from chronos.config import Config, load_config
from chronos.daemon.clock import SteadyClock
from chronos.daemon.deadlines import Deadlines
from chronos.daemon.jobs import JobRunner
from chronos.daemon.log import log
from chronos.daemon.notify import sd_notify
from chronos.daemon.sampler import Sampler
from chronos.daemon.server import FD_RESERVE, Broadcast, Listener, RateLimitedLog, Server
from chronos.daemon.user_sockets import UserSockets
from chronos.errors import ChronosError
from chronos.ledger import Ended, Ledger
from chronos.ledger.jobs import Job
from chronos.ledger.partitions import Lingering
from chronos.paths import (
    LEDGER_FILE,
    LEDGER_ID_FILE,
    LEDGER_SUFFIXES,
    SYSTEM_STATE_DIR,
    UnsafePath,
    check_trusted_path,
    open_dir,
    open_file,
    socket_path,
    verify_regular,
)
from chronos.service import Service
from chronos.slurm.reconcile import start_slurm

LOCK_FILE = "chronosd.lock"
LISTEN_BACKLOG = 4096
"""The kernel caps it at net.core.somaxconn."""
COMPACT_BUSY_S = 0.05
"""Pause between retention batches while old history remains."""
COMPACT_IDLE_S = 300.0


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
    parser.add_argument("--version", action="version", version=f"chronosd {_version()}")
    return parser.parse_args(argv)


def _version() -> str:
    """The installed distribution's version (the same one ``chronos --version`` prints)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chronos-gpu")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from chronos import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state_dir = args.state_dir or Path(os.environ.get("CHRONOS_HOME") or SYSTEM_STATE_DIR)
    if args.socket is None and not os.environ.get("CHRONOS_SOCKET") and args.state_dir:
        os.environ["CHRONOS_HOME"] = str(state_dir)
    sock_path = args.socket or socket_path()
    raise_descriptor_limit()
    os.environ["CHRONOS_SOCKET"] = str(sock_path)  # the cap files live beside it (alloccap)
    try:
        return asyncio.run(
            Daemon(state_dir, sock_path, args.config, args.metrics, args.dashboard).run()
        )
    except ChronosError as exc:
        print(f"chronosd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit.

    Every client connection is a descriptor: with the usual soft limit of 1,024,
    one user's idle connections starved the ledger, the sampler and the pidfds
    of the expiry signals. The unit sets ``LimitNOFILE=65536`` as well.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log("nofile_not_raised", level="warning", soft=soft, hard=hard, error=str(exc))
    return soft


def max_client_connections() -> int:
    """Connections all clients together may hold: the descriptor limit less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(8, soft - max(FD_RESERVE, soft // 8))


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
        self.quiet_log = RateLimitedLog()

    async def run(self) -> int:
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        self._prepare_state_dir()
        self._take_lock()
        service, deadlines, sampler = self._build()
        # Everything is wired: now act on what happened while no daemon ran.
        deadlines.resume_kills()  # SIGKILLs a previous daemon scheduled but did not send
        self._changed()  # expiries that fell due while no daemon ran

        following = self.following
        sampling = asyncio.create_task(sampler.run())
        compacting = asyncio.create_task(self._compact(service))
        server = Server(
            service.handle,
            lambda: self.config.admin_group,
            self.broadcast,
            max_connections=max_client_connections(),
            quiet_log=self.quiet_log,
        )
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
            cgroups=_cgroups_shown(service.cgroups),
            devices=len(service.machine.devices),
            max_connections=server.max_connections,
        )
        sd_notify("READY=1")
        try:
            await self._stop.wait()
        finally:
            sd_notify("STOPPING=1")
            sampling.cancel()
            compacting.cancel()
            if following is not None and following.task is not None:
                following.task.cancel()
            for endpoint in endpoints:
                endpoint.close()
            listener.close()
            self.user_sockets.close()
            deadlines.close()
            self.jobs.close()
            service.close()
            self._remove_socket()
            log("stopped")
        return 0

    def _build(self) -> tuple[Service, Deadlines, Sampler]:
        """The ledger, service, deadline keeper and sampler, each complete when made.

        Each gets its collaborators and hooks in its constructor. The deadline keeper
        and the sampler need each other (it tells the sampler of ended partitions and
        asks it who holds GPU memory; the sampler stops violators through it), so the
        deadline keeper's hooks go through this daemon to the sampler built just after.
        Nothing runs until all are built: no reap happens with a hook missing.
        """
        # Admission and reaping run on the deadline keeper's clock, which never steps.
        clock = SteadyClock()
        ledger = self._open_ledger(clock.now, self._lingering)
        deadlines = Deadlines(
            ledger,
            lambda: self.config.grace_s,
            max_grace_s=lambda: self.config.max_grace_s,
            clock=clock,
            on_ended=self._ended,
            after_time=self._changed,
            holds_gpu=self._holds_gpu,
        )
        service = Service(
            ledger,
            self.config,
            "daemon",
            cgroups=PartitionCgroups.detect(),
            on_change=self._changed,
            on_supervised=deadlines.supervised,
            stop_job=self._stop_job,
        )
        service.machine  # noqa: B018 - open the GPU backends now, not on the first request
        # Following Slurm (docs/SLURM.md): its first pass runs once the loop turns.
        self.following = start_slurm(service, lambda: self.config, self._changed)
        sampler = Sampler(
            service,
            deadlines,
            lambda: self.config,
            on_new_unpartitioned=self.following.kick if self.following is not None else None,
        )
        self.jobs = JobRunner(service, deadlines.stopper, self.state_dir)
        self.service, self.deadlines, self.sampler = service, deadlines, sampler
        return service, deadlines, sampler

    def _ended(self, ended: list[Ended]) -> None:
        self.sampler.on_ended(ended)

    def _stop_job(self, job: Job) -> None:
        self.jobs.stop(job)

    def _lingering(self, device_uuid: str) -> list[tuple[float, float, int, str]]:
        return self.deadlines.stopper.lingering_on(device_uuid)

    def _holds_gpu(self, pid: int) -> bool:
        return self.sampler.holds_gpu(pid)

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
                self.deadlines.changed()  # guarded: logs and retries its own failures
                try:
                    self.service.grant_waiting()
                except Exception as exc:  # noqa: BLE001 - a failed grant must not end the chain
                    log("grant_failed", level="error", error=repr(exc))
                self.jobs.changed()  # guarded per job: start, adopt or fail batch jobs
        finally:
            self._busy = False
        self.broadcast.notify()

    async def _compact(self, service: Service) -> None:
        """Retention: delete history older than ``history_retention`` a small batch at a
        time (each its own short transaction), so clients are never kept waiting."""
        while True:
            try:
                gone = service.compact_history()
            except (ChronosError, sqlite3.Error) as exc:
                log("compact_failed", level="error", error=str(exc))
                gone = 0
            await asyncio.sleep(COMPACT_BUSY_S if gone else COMPACT_IDLE_S)

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
        """Make the state directory, or check it: a real directory only root may write.

        As root the daemon writes its ledger and lock there: a symlink (``--state-dir``
        through ``/tmp/x -> /etc``) or a directory another user owns would let that user
        point those writes at a root file. So neither is used (nor a path through another
        user's directory or link), and mode and group are set through its descriptor.
        """
        if os.geteuid() == 0:
            check_trusted_path(self.state_dir)
        try:
            self.state_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.state_dir, 0o755)
        except OSError as exc:
            raise ChronosError(f"cannot use state directory {self.state_dir}: {exc}") from None
        fd = open_dir(self.state_dir)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise UnsafePath(
                    f"state directory {self.state_dir} belongs to uid {st.st_uid}, not to "
                    f"chronosd's (uid {os.geteuid()}): chown it or choose another --state-dir"
                )
            if os.geteuid() == 0 and st.st_gid != 0:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o755)  # group and others may look, never add or swap a file
        finally:
            os.close(fd)

    def _take_lock(self) -> None:
        path = self.state_dir / LOCK_FILE
        fd, _ = open_file(path, 0o644)
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            raise UnsafePath(f"lock file {path} is not chronosd's own: remove it")
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

    def _open_ledger(self, clock: Callable[[], float], lingering: Lingering) -> Ledger:
        """The ledger this daemon had, locked down to it; refuse a vanished or swapped one.

        A deleted or emptied ledger would otherwise be replaced by an empty one: every
        open partition forgotten, their memory handed out again. The marker
        ``ledger.id`` beside it records that this directory had a ledger, and which.
        """
        path = self.state_dir / LEDGER_FILE
        marker = self.state_dir / LEDGER_ID_FILE
        had = self._recorded_ledger_id(marker)
        if had is not None:
            self._check_ledger_present(path, marker, had)
        self._lock_down(path)
        ledger = Ledger(
            path,
            clock,
            file_mode=0o644,
            reap_owners=False,  # owner deaths come from pidfds (Deadlines), not /proc scans
            lingering=lingering,
        )
        if had is None:
            self._record_ledger_id(marker, ledger.ledger_id)
        elif ledger.ledger_id != had:
            ledger.close()
            raise ChronosError(
                f"ledger {path} is not this daemon's (its id is {ledger.ledger_id}, "
                f"{marker} says {had}): put the right ledger back, or remove {marker} "
                "to adopt this one"
            )
        return ledger

    @staticmethod
    def _recorded_ledger_id(marker: Path) -> str | None:
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnsafePath(f"cannot read {marker}: {exc.strerror}; remove it") from None
        try:
            verify_regular(fd, marker)
            text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        return text or None  # empty: never completed (it is written whole, then renamed)

    @staticmethod
    def _check_ledger_present(path: Path, marker: Path, had: str) -> None:
        try:
            size = os.lstat(path).st_size
        except FileNotFoundError:
            size = None
        if size:
            return
        state = "missing" if size is None else "empty (0 bytes)"
        raise ChronosError(
            f"ledger {path} is {state} but this daemon had one (id {had}): restore it "
            f"from backup, or remove {marker} to start with an empty ledger"
        )

    def _record_ledger_id(self, marker: Path, ledger_id: str) -> None:
        """Write the marker durably (a new file, then rename): half a marker is no marker."""
        partial = self.state_dir / f".{LEDGER_ID_FILE}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        fd, _ = open_file(partial, 0o644)
        try:
            os.write(fd, f"{ledger_id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, marker)
        dir_fd = open_dir(self.state_dir)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _lock_down(self, ledger_path: Path) -> None:
        """The daemon is the only writer: its ledger files are writable by it alone.

        Done on each file's descriptor (opened without following a symlink), so a link
        planted in place of ``-wal`` never makes root chown or chmod what it points at.
        """
        for suffix in LEDGER_SUFFIXES:
            path = Path(f"{ledger_path}{suffix}")
            if not os.path.lexists(path):
                continue  # created by the Ledger, with the daemon's mode
            fd, _ = open_file(path, 0o644)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's errors as one rate-limited JSON line, never a traceback per event."""
        exc = context.get("exception")
        self.quiet_log(
            "loop_error",
            level="error",
            message=str(context.get("message", "?"))[:200],
            error=repr(exc)[:200] if exc is not None else None,
        )

    async def _listen(self, server: Server) -> Listener:
        self.sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # Our state lock does not cover a daemon of another state dir on this socket:
        # taking its socket over would leave its clients on the wrong ledger.
        if self._socket_answers():
            raise ChronosError(
                f"another chronosd is already running on {self.sock_path} (another state dir)"
            )
        self._remove_socket()  # nobody answers: a dead daemon's socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.sock_path))
            os.chmod(self.sock_path, 0o666)  # anyone may connect; SO_PEERCRED says who they are
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ChronosError(f"cannot listen on {self.sock_path}: {exc.strerror}") from None
        own = UserSockets(self.sock_path, lambda user_sock: self._serve_socket(user_sock, server))
        self.user_sockets = own
        listener = Listener(sock, server, self.quiet_log, on_admitted=own.ensure)
        listener.start()
        return listener

    def _serve_socket(self, sock: socket.socket, server: Server) -> Callable[[], None]:
        """Serve one user's own listening socket (daemon/user_sockets.py); return its closer."""
        listener = Listener(sock, server, self.quiet_log)
        listener.start()
        return listener.close

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


def _cgroups_shown(cgroups: PartitionCgroups | None) -> str:
    return str(cgroups.base) if cgroups is not None and cgroups.available else "unavailable"


if __name__ == "__main__":  # python -m chronos.daemon.main
    sys.exit(main())
