"""Who is asking: a caller's Unix identity and whether they administer Chronos."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from chronos.procs import user_name


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int | None
    user: str
    is_admin: bool

    @classmethod
    def of_process(cls, uid: int, gid: int, pid: int | None, admin_group: str) -> Caller:
        name = user_name(uid)
        return cls(uid, gid, pid, name, is_admin(uid, gid, name, admin_group))

    @classmethod
    def this_process(cls, admin_group: str) -> Caller:
        return cls.of_process(os.getuid(), os.getgid(), os.getpid(), admin_group)


def is_admin(uid: int, gid: int, name: str, admin_group: str) -> bool:
    if uid == 0:
        return True
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if gid == group.gr_gid or name in group.gr_mem:
        return True
    try:
        return group.gr_gid in os.getgrouplist(name, gid)
    except (KeyError, OSError):
        return False


def resolve_user(name: str) -> tuple[int, str]:
    """``alice`` or ``1001`` -> (uid, name) of an existing account."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        from chronos.errors import BadRequest

        raise BadRequest(f"no such user {name!r} on this machine") from None
    return entry.pw_uid, entry.pw_name
