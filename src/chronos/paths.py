"""Where Chronos keeps its state, and where the daemon listens.

State directory (the ledger database): ``$CHRONOS_HOME`` if set; else the
daemon's ``/var/lib/chronos`` if it exists; else ``/var/tmp/chronos``, which
the first user creates world-writable with the sticky bit (like /tmp) so that
every user of the machine shares one embedded ledger.

Socket: ``$CHRONOS_SOCKET`` if set; else ``$CHRONOS_HOME/chronosd.sock`` when
``CHRONOS_HOME`` is set (so tests never meet the system daemon); else
``/run/chronos/chronosd.sock``.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/chronos")
SHARED_STATE_DIR = Path("/var/tmp/chronos")
SYSTEM_SOCKET = Path("/run/chronos/chronosd.sock")
LEDGER_FILE = "ledger.db"


def state_dir() -> Path:
    home = os.environ.get("CHRONOS_HOME")
    if home:
        return Path(home)
    if SYSTEM_STATE_DIR.is_dir():
        return SYSTEM_STATE_DIR
    return SHARED_STATE_DIR


def socket_path() -> Path:
    explicit = os.environ.get("CHRONOS_SOCKET")
    if explicit:
        return Path(explicit)
    home = os.environ.get("CHRONOS_HOME")
    if home:
        return Path(home) / "chronosd.sock"
    return SYSTEM_SOCKET


def ensure_shared_dir(path: Path) -> None:
    """Create ``path`` so every local user can use it, like /tmp (mode 1777).

    Only a directory we create gets this mode; an existing one (e.g. the
    daemon's root-owned 0755 directory) is left as its owner set it.
    """
    if path.is_dir():
        return
    try:
        path.mkdir(parents=True, mode=0o755)
    except FileExistsError:
        return
    os.chmod(path, 0o1777)
