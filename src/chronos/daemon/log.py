"""One JSON object per line on stderr (journald keeps stderr of a unit)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def log(event: str, level: str = "info", **fields: Any) -> None:
    record = {"ts": round(time.time(), 6), "level": level, "event": event, **fields}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()
