"""Helpers shared by the test folders: a real ``chronosd``, polling, clean environments, accounts.

Import it as ``from chronos_testing import ...``: pytest puts ``tests/`` on ``sys.path``
(the rootdir conftest, prepend import mode); ``tests`` itself is not a package.

* :class:`DaemonProcess` runs ``python -m chronos.daemon.main`` (simulated GPUs) on its
  own state directory and socket under ``/tmp`` (traversable by every user, so clients
  running as other accounts can reach it), optionally with a policy file it can rewrite
  and reload with SIGHUP.
* :class:`TestUser` runs commands as an ordinary account through ``setpriv``;
  :func:`unix_accounts` creates such accounts for a test session (and removes them).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from helpers import UNSET

from chronos.api import Partitioner
from chronos.errors import ChronosError
from chronos.transport import SocketTransport

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
PY = sys.executable

#: Variables of the surrounding shell that could point a test at another Chronos: the
#: embedded tests' list (helpers.UNSET) and what a daemon test sets itself.
SCRUBBED = (
    *UNSET,
    "CHRONOS_HOME",
    "CHRONOS_MODE",
    "CHRONOS_BACKEND",
    "CHRONOS_PARTITION_ID",
    "CHRONOS_SOFT_LIMIT_BYTES",
    "CHRONOS_DEVICE_TOTAL_BYTES",
    "CHRONOS_PARTITION_BYTES",
    "PYTHONPATH",
    "NOTIFY_SOCKET",
)

READY_TIMEOUT_S = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Chronos setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def shared_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may traverse (0755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def chronos_argv(*args: str) -> list[str]:
    """argv of ``chronos ARGS`` run by this interpreter."""
    return [PY, "-m", "chronos.cli", *args]


# ----------------------------------------------------------------------------- daemon


class DaemonProcess:
    """One ``chronosd`` on a private state directory; restartable on the same state.

    ``config``: the policy file's text (None: no file, the defaults, whatever /etc
    holds). ``args``: extra daemon flags. ``extra_env``: extra daemon variables.
    """

    def __init__(
        self,
        base: Path | None = None,
        extra_env: dict[str, str] | None = None,
        *,
        config: str | None = None,
        args: Sequence[str] = (),
        prefix: str = "chronos-d-",
    ) -> None:
        self.base = base if base is not None else shared_tmpdir(prefix)
        self.state_dir = self.base
        self.sock = self.base / "sock"
        self.config_path = self.base / "config.toml"
        self.args = tuple(args)
        settings = {
            "CHRONOS_BACKEND": "simulated",
            "CHRONOS_HOME": str(self.state_dir),
            "CHRONOS_SOCKET": str(self.sock),
        }
        if config is not None:
            self.write_config(config)
            settings["CHRONOS_CONFIG"] = str(self.config_path)
        self.env = clean_env(**settings, CHRONOS_MODE="daemon")
        self.daemon_env = {**self.env, **(extra_env or {})}
        del self.daemon_env["CHRONOS_MODE"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.children: list[subprocess.Popen[Any]] = []

    @property
    def home(self) -> Path:
        return self.state_dir

    # ------------------------------------------------------------------ lifecycle

    def argv(self, sock: Path | None = None) -> list[str]:
        return [
            PY,
            "-m",
            "chronos.daemon.main",
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(sock or self.sock),
            "--config",
            str(self.config_path),
            *self.args,
        ]

    def start(self, wait: bool = True, extra_env: dict[str, str] | None = None) -> DaemonProcess:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        log_path = self.new_log_path()
        self.logs.append(log_path)
        with open(log_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                env={**self.daemon_env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd="/",
            )
        if wait:
            self.wait_ready()
        return self

    def new_log_path(self) -> Path:
        """Where the next start logs: one file per start."""
        return self.base / f"chronosd.{len(self.logs)}.log"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"chronosd exited with {self.proc.returncode} before answering:\n"
                    + self.log_text()
                )
            try:
                self.ping(timeout=1.0)
                return
            except (ChronosError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"chronosd did not answer within {timeout}s:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        transport = SocketTransport(self.sock, timeout=timeout)
        try:
            result: dict[str, Any] = transport.call("ping")
            return result
        finally:
            transport.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait for the daemon to exit; return its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop (with ``sig``) if running, then start again on the same state and socket."""
        if self.alive():
            self.kill(sig)
        self.start()

    def cleanup(self) -> None:
        """End the background processes and the daemon; remove the state directory."""
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # --------------------------------------------------------------------- policy

    def write_config(self, text: str) -> None:
        """Write the policy file (readable by every user)."""
        self.config_path.write_text(text)
        os.chmod(self.config_path, 0o644)

    write_policy = write_config

    def reload(self) -> None:
        """SIGHUP, then wait for the daemon to log that it took the new policy."""
        assert self.proc is not None
        before = len(self.events("config_reloaded"))
        self.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: len(self.events("config_reloaded")) > before,
            5.0,
            what="config_reloaded in the daemon log",
        )

    def reconfigure(self, config: str) -> None:
        """Rewrite the policy file and SIGHUP the daemon; wait until it reloaded."""
        self.write_config(config)
        self.reload()

    # ----------------------------------------------------------------------- logs

    @property
    def log_path(self) -> Path:
        """The log of the current (or last) run."""
        return self.logs[-1]

    def log_text(self, all_runs: bool = False) -> str:
        paths = self.logs if all_runs else self.logs[-1:]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def log_lines(self, all_runs: bool = False) -> list[dict[str, Any]]:
        """The JSON log records of the current run (``all_runs``: of every run)."""
        out = []
        for line in self.log_text(all_runs).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "_raw", "text": line}
            if not isinstance(record, dict):
                record = {"event": "_raw", "text": line}
            out.append(record)
        return out

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        """The log records (of every run) of event ``name`` with the ``match`` fields."""
        return [
            r
            for r in self.log_lines(all_runs=True)
            if r.get("event") == name and all(r.get(k) == v for k, v in match.items())
        ]

    log_events = events

    def logged(self, name: str) -> dict[str, Any] | None:
        """The first record of event ``name``, or None."""
        found = self.events(name)
        return found[0] if found else None

    def wait_event(self, name: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        found = wait_for(
            lambda: self.events(name, **match), timeout, what=f"log event {name} {match}"
        )
        return found[0]  # type: ignore[no-any-return]

    wait_log = wait_event

    def address_of(self, event: str) -> str:
        """``host:port`` a server logged it listens on (``metrics_serving``, …)."""
        return str(self.wait_event(event)["address"])

    # --------------------------------------------------------------------- clients

    def transport(self, timeout: float = 30.0) -> SocketTransport:
        return SocketTransport(self.sock, timeout=timeout)

    def call(self, op: str, **args: Any) -> Any:
        """One request; a listing (``list``, ``events``) comes whole, page by page."""
        transport = self.transport()
        try:
            if op == "list" and set(args) <= {"all"}:
                return Partitioner(transport).records(all=bool(args.get("all")))
            if op == "events" and set(args) <= {"since", "id"}:
                return Partitioner(transport).events(args.get("since"), args.get("id"))
            return transport.call(op, **args)
        finally:
            transport.close()

    @contextlib.contextmanager
    def partitioner(self) -> Iterator[Partitioner]:
        client = Partitioner(self.transport())
        try:
            yield client
        finally:
            client.close()

    def record(self, partition_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("get", id=partition_id)
        return result

    def open_ids(self) -> set[str]:
        return {r["id"] for r in self.call("list")}

    def queue(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("queue")
        return result

    def cli(
        self, *args: str, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``chronos ARGS`` as this test's user (root in CI), in daemon mode."""
        return subprocess.run(
            chronos_argv(*args),
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def cli_json(self, *args: str) -> Any:
        """The parsed output of ``chronos ARGS --json``, which must succeed."""
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def spawn(
        self, argv: list[str], env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """A background process, ended at cleanup (its whole process group)."""
        kwargs.setdefault("cwd", "/")
        proc = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        self.children.append(proc)
        return proc


@contextlib.contextmanager
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Make (and start) daemons with ``DaemonProcess``'s arguments; all cleaned up on exit.

    ``start=False`` makes one without starting it; ``factory`` is the class to make.
    """
    made: list[DaemonProcess] = []

    def make(
        *args: Any, factory: type[DaemonProcess] = DaemonProcess, start: bool = True, **kwargs: Any
    ) -> Any:
        d = factory(*args, **kwargs)
        made.append(d)
        return d.start() if start else d

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()


# ----------------------------------------------------------------------------- users


@dataclass
class TestUser:
    """An ordinary Unix account the tests run commands as (through setpriv)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    name: str
    uid: int
    gid: int
    python: list[str] = field(default_factory=lambda: [PY])
    python_env: dict[str, str] = field(default_factory=dict)

    def argv(self, *command: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            *command,
        ]

    def python_argv(self, *args: str) -> list[str]:
        return self.argv(*self.python, *args)

    def env(self, base: Mapping[str, str], **extra: str) -> dict[str, str]:
        return {
            **base,
            **self.python_env,
            "HOME": "/",
            "USER": self.name,
            "LOGNAME": self.name,
            "PYTHONDONTWRITEBYTECODE": "1",
            **extra,
        }

    def run(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            input=input,
        )

    def cli(
        self, *args: str, env: dict[str, str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """``chronos ARGS`` run as this user."""
        return self.run(self.python_argv("-m", "chronos.cli", *args), env, timeout)

    def run_python(
        self, code: str, *args: str, env: dict[str, str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.run(self.python_argv("-c", code, *args), env, timeout)

    def popen(
        self, command: Sequence[str], env: dict[str, str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*command), env=self.env(env), cwd="/", **kwargs)


def user_python_candidates() -> list[tuple[list[str], dict[str, str]]]:
    """Interpreters an ordinary user may run the source tree with, best first.

    The venv's interpreter can be a link into a directory other users cannot
    enter (e.g. pyenv under /root); then a system Python of the same minor
    version runs the same source and the venv's (pure and ABI-compatible)
    packages through PYTHONPATH.
    """
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    path_env = {"PYTHONPATH": os.pathsep.join([str(SRC), str(SITE_PACKAGES)])}
    out: list[tuple[list[str], dict[str, str]]] = [([PY], {})]
    for candidate in (f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        if os.path.exists(candidate):
            out.append(([candidate], path_env))
    return out


#: Several test sessions (several people, one machine) may use the accounts at once:
#: each holds a shared lock on ACCOUNTS_LOCK while it does (and ACCOUNTS_MUTEX, briefly,
#: while it creates some); the last one out removes what tests created.
ACCOUNTS_LOCK = Path("/tmp/chronos-test-accounts.lock")
ACCOUNTS_MUTEX = Path("/tmp/chronos-test-accounts.mutex")
ACCOUNTS_CREATED = Path("/tmp/chronos-test-accounts.json")
ACCOUNT_TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "usermod", "setpriv")

_in_use: list[IO[str]] = []  # this process's shared lock, while any fixture holds accounts
_holders = 0


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def _created() -> list[list[str]]:
    try:
        return [list(item) for item in json.loads(ACCOUNTS_CREATED.read_text())]
    except (OSError, ValueError):
        return []


def _record_created(kind: str, name: str) -> None:
    ACCOUNTS_CREATED.write_text(json.dumps([*_created(), [kind, name]]))


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
        return
    except KeyError:
        pass
    proc = _run("groupadd", name)
    if proc.returncode != 0:
        pytest.skip(f"cannot create group {name}: {proc.stderr.strip()}")
    _record_created("group", name)


def _ensure_user(name: str, groups: Sequence[str] = ()) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        proc = _run(*argv, name)
        if proc.returncode != 0:
            pytest.skip(f"cannot create user {name}: {proc.stderr.strip()}")
        _record_created("user", name)
        return
    for group in groups:  # an account left from an earlier run: make sure of its groups
        if name not in grp.getgrnam(group).gr_mem:
            _run("usermod", "--append", "--groups", group, name)


def _remove_created() -> None:
    for kind, name in reversed(_created()):
        _run("userdel" if kind == "user" else "groupdel", name)
    ACCOUNTS_CREATED.unlink(missing_ok=True)


def _test_user(name: str, python: list[str], python_env: dict[str, str]) -> TestUser:
    entry = pwd.getpwnam(name)
    return TestUser(name, entry.pw_uid, entry.pw_gid, python, python_env)


def _pick_python(probe: TestUser) -> tuple[list[str], dict[str, str]]:
    tried = []
    for python, extra in user_python_candidates():
        candidate = TestUser(probe.name, probe.uid, probe.gid, python, extra)
        proc = candidate.run_python("import chronos.cli, chronos.api", env=clean_env())
        if proc.returncode == 0:
            return python, extra
        tried.append(f"{' '.join(python)}: {proc.stderr.strip().splitlines()[-1:]}")
    pytest.skip(
        "no Python interpreter can import chronos as an ordinary user (the venv and source "
        "tree must be readable and traversable by every user); tried " + "; ".join(tried)
    )


def _acquire_accounts() -> None:
    global _holders
    if not _in_use:
        lock = open(ACCOUNTS_LOCK, "a")  # noqa: SIM115 - held across fixtures
        fcntl.flock(lock, fcntl.LOCK_SH)
        _in_use.append(lock)
    _holders += 1


def _release_accounts() -> None:
    global _holders
    _holders -= 1
    if _holders:
        return
    lock = _in_use.pop()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another session still uses the accounts; the last one removes them
    else:
        _remove_created()
    finally:
        lock.close()


@contextlib.contextmanager
def unix_accounts(
    *names: str,
    groups: Mapping[str, Sequence[str]] | None = None,
    why: str = "needs root to create Unix accounts and run as them",
) -> Iterator[list[TestUser]]:
    """Ordinary Unix accounts ``names`` (created for real where missing), as TestUsers.

    ``groups`` maps an account to the groups it must belong to (created where missing).
    Skips the test where accounts cannot be made or used. Accounts this creates are
    removed when the last holder (of every test session on the machine) is done.
    """
    groups = groups or {}
    if os.geteuid() != 0:
        pytest.skip(why)
    for tool in ACCOUNT_TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}, which is not installed")
    _acquire_accounts()
    try:
        with open(ACCOUNTS_MUTEX, "a") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            for group in sorted({g for gs in groups.values() for g in gs}):
                _ensure_group(group)
            for name in names:
                _ensure_user(name, groups.get(name, ()))
        python, extra = _pick_python(_test_user(names[0], [], {}))
        yield [_test_user(name, python, extra) for name in names]
    finally:
        _release_accounts()


# ----------------------------------------------------------------------------- output


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)
