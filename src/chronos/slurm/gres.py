"""Does ``gres.conf`` promise more shards than a GPU's memory holds?

One shard is ``slurm.shard_bytes`` of GPU memory, so a GPU with ``Count=N``
shards must have at least ``N × shard_bytes`` reservable; otherwise Slurm can
place jobs whose partitions the node cannot admit. chronosd checks this at start
(and ``chronos slurm check`` on demand) and names each GPU that does not fit.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chronos.config import Config
from chronos.devices.base import Device
from chronos.slurm.scontrol import expand_hostlist
from chronos.units import format_bytes


@dataclass(frozen=True)
class ShardLine:
    nodes: tuple[str, ...] | None
    """None: the line applies to every node."""
    count: int
    device: int | None
    """The GPU index from ``File=…/nvidiaN`` (None: no File, spread over the GPUs)."""


def parse_gres(text: str) -> list[ShardLine]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = {}
        for token in shlex.split(line):
            key, _, value = token.partition("=")
            fields[key.lower()] = value
        if fields.get("name") != "shard":
            continue
        nodes = tuple(expand_hostlist(fields["nodename"])) if "nodename" in fields else None
        number = re.search(r"(\d+)$", fields.get("file", ""))
        out.append(
            ShardLine(
                nodes=nodes,
                count=int(fields.get("count", "1") or 1),
                device=int(number.group(1)) if number else None,
            )
        )
    return out


def shards_per_device(lines: list[ShardLine], node: str, gpus: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in lines:
        if line.nodes is not None and node not in line.nodes:
            continue
        if line.device is not None:
            counts[line.device] = counts.get(line.device, 0) + line.count
        else:
            for device in range(gpus):
                counts[device] = counts.get(device, 0) + line.count // max(1, gpus)
    return counts


def check_gres(config: Config, devices: Sequence[Device], node: str) -> list[str]:
    """One line per GPU whose shards do not fit its memory (empty: all fit)."""
    path = Path(config.slurm.gres_conf)
    try:
        text = path.read_text()
    except OSError as exc:
        return [f"cannot read {path}: {exc.strerror}; shard counts not checked"]
    counts = shards_per_device(parse_gres(text), node, len(devices))
    by_index = {d.index: d for d in devices}
    problems = []
    shard = config.slurm.shard_bytes
    for index, count in sorted(counts.items()):
        dev = by_index.get(index)
        if dev is None:
            problems.append(f"{path}: node {node} has shards on GPU {index}, which is not here")
            continue
        room = config.reservable_bytes(dev.index, dev.total_bytes)
        if count * shard > room:
            problems.append(
                f"{path}: GPU {index} of {node} has {count} shards of {format_bytes(shard)} "
                f"= {format_bytes(count * shard)}, but only {format_bytes(room)} reservable: "
                f"set Count={room // shard} there"
            )
    return problems
