"""The ``jobs`` table: batch jobs (``chronos submit``) and each step of their lives.

A job is a command chronosd starts as its user once the job's partition is granted
(docs/DAEMON.md, "Batch jobs"). Its row holds everything the start needs (argv, the
submit-time environment, working directory, umask, uid and groups, output paths), so a
restarted daemon can start a waiting job or re-adopt a running one from ``(pid,
start_ticks)``. The facade writes each lifecycle step in its own transaction; this part
never opens one.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import dataclass, fields, replace
from typing import Any

from chronos.ledger.records import Rows
from chronos.vocabulary import JOB_ENDED, JobState


@dataclass(frozen=True)
class Job:
    """One batch job, as stored."""

    id: str
    created_at: float
    uid: int
    user: str
    gid: int
    groups: tuple[int, ...]
    name: str | None
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    umask: int
    output: str
    error: str | None
    after: str | None
    """The job this one waits for (any end state)."""
    ticket_id: str | None
    partition_id: str | None
    state: str
    """A :class:`~chronos.vocabulary.JobState`."""
    request: dict[str, Any]
    """The partition's create arguments (asked for at submit, or once ``after`` ended)."""
    pid: int | None = None
    start_ticks: int | None = None
    exit_code: int | None = None
    reason: str | None = None
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.state in JOB_ENDED

    def to_wire(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(argv=list(self.argv), groups=list(self.groups))
        del out["env"], out["request"]  # the environment may hold secrets: never listed
        return out


def _tuple(text: str) -> tuple[Any, ...]:
    return tuple(json.loads(text))


JOBS: Rows[Job] = Rows(
    Job,
    "jobs",
    [f.name for f in fields(Job)],
    convert={"groups": _tuple, "argv": _tuple, "env": json.loads, "request": json.loads},
)
_OPEN = f"state IN ({', '.join(repr(str(s)) for s in JobState if s not in JOB_ENDED)})"


class Jobs:
    """The ``jobs`` table (the facade's part; it opens no transactions)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @staticmethod
    def new_id() -> str:
        return "j" + secrets.token_hex(4)[:7]

    def add(self, job: Job) -> None:
        values = list(JOBS.values(job))
        for i, name in enumerate(JOBS.written):
            if name in ("groups", "argv"):
                values[i] = json.dumps(list(values[i]))
            elif name in ("env", "request"):
                values[i] = json.dumps(values[i])
        self._db.execute(JOBS.insert_sql, values)

    def get(self, job_id: str) -> Job | None:
        return JOBS.one(
            self._db.execute(f"SELECT {JOBS.columns} FROM jobs WHERE id = ?", (job_id,))
        )

    def by_prefix(self, prefix: str) -> list[Job]:
        cursor = self._db.execute(
            f"SELECT {JOBS.columns} FROM jobs WHERE id >= ? AND id < ? LIMIT 2",
            (prefix, prefix + "\U0010ffff"),
        )
        return JOBS.all(cursor)

    def open(self) -> list[Job]:
        """Jobs not ended yet (few: the daemon reads them after every change)."""
        return JOBS.all(
            self._db.execute(
                f"SELECT {JOBS.columns} FROM jobs INDEXED BY jobs_open WHERE {_OPEN} "
                "ORDER BY created_at"
            )
        )

    def listing(self, uid: int | None, limit: int = 500) -> list[Job]:
        where, args = ("WHERE uid = ?", (uid,)) if uid is not None else ("", ())
        cursor = self._db.execute(
            f"SELECT {JOBS.columns} FROM jobs {where} ORDER BY created_at DESC LIMIT ?",
            (*args, limit),
        )
        return JOBS.all(cursor)

    def update(self, job: Job, **changes: Any) -> Job:
        """Write ``changes`` to the job's row (state, pid, exit code, …)."""
        updated = replace(job, **changes)
        sets = ", ".join(f"{name} = ?" for name in changes)
        self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*changes.values(), job.id))
        return updated
