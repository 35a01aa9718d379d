"""The parent of a batch job's command: started by chronosd, already as the job's user.

chronosd starts ``python3 -I -S -c <this source> GATE STATUS CWD OUTPUT ERROR -- ARGV...``
with the user's uid, gids, supplementary groups and umask already set (by
``subprocess``, before exec) and in a new session; this stub, stdlib only:

1. checks the drop held (real, effective and saved uid and gid are the user's, and
   uid 0 cannot be taken back);
2. waits at the gate (fd GATE) until the daemon has put it in the partition's cgroup;
3. changes to the working directory and opens the output files *as the user*
   (``O_NOFOLLOW``, append), so root never writes where the user could not;
4. forks and execs the command (stdin ``/dev/null``), ignoring SIGTERM itself (the
   command gets the daemon's signals; the stub stays to see how it ends);
5. writes ``exit N``, ``signal N`` or ``failed REASON`` to STATUS (an fd the daemon
   opened on a file of its own state directory), which the daemon reads when the stub
   is gone, also after a restart of the daemon (it cannot reap a previous
   incarnation's children).
"""

import os
import signal
import sys

STAYS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Ignored by the stub, which must outlive its command to record how it ended."""
NOFOLLOW = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


def _say(status_fd: int, text: str) -> None:
    os.write(status_fd, text.encode()[:4000])


def _dropped() -> str | None:
    uid, gid = os.getuid(), os.getgid()
    if set(os.getresuid()) != {uid} or set(os.getresgid()) != {gid}:
        return "privileges were not fully dropped"
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return None
        return "uid 0 could be taken back"
    return None


def _open_output(path: str) -> int:
    try:
        return os.open(path, NOFOLLOW, 0o666)
    except OSError as exc:
        raise RuntimeError(f"cannot open {path}: {exc.strerror}") from None


def _prepare(cwd: str, output: str, error: str) -> tuple[int, int]:
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise RuntimeError(f"cannot enter {cwd}: {exc.strerror}") from None
    out = _open_output(output)
    return out, (_open_output(error) if error else out)


def _child(out: int, err: int, argv: list[str], report: int) -> None:
    for sig in STAYS:  # the command gets the default actions back (SIG_IGN survives exec)
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(report, f"{argv[0]}: {exc.strerror}".encode())
    os._exit(127)


def main() -> int:
    gate, status = int(sys.argv[1]), int(sys.argv[2])
    cwd, output, error = sys.argv[3], sys.argv[4], sys.argv[5]
    argv = sys.argv[7:]
    problem = _dropped()
    if problem:
        _say(status, f"failed {problem}")
        return 1
    if os.read(gate, 1) != b"1":
        _say(status, "failed chronosd did not start it")
        return 1
    os.close(gate)
    try:
        out, err = _prepare(cwd, output, error)
    except RuntimeError as exc:
        _say(status, f"failed {exc}")
        return 1
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    for sig in STAYS:  # before the fork: a SIGTERM right after it must not end the stub
        signal.signal(sig, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        _child(out, err, argv, report_w)
    os.close(report_w)
    exec_error = os.read(report_r, 4000).decode(errors="replace")
    _, code = os.waitpid(pid, 0)
    if exec_error:
        _say(status, f"failed {exec_error}")
    elif os.WIFSIGNALED(code):
        _say(status, f"signal {os.WTERMSIG(code)}")
    else:
        _say(status, f"exit {os.waitstatus_to_exitcode(code)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
