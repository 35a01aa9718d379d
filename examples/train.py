"""A stand-in training job that shows a partition from the inside.

Run it under ``chronos run`` (the README's first command), or alone: then it
reserves its own partition through the Python API.
"""

from __future__ import annotations

import os
import time

from chronos import Partition, Partitioner
from chronos.units import format_bytes


def train(p: Partition, epochs: int = 3) -> None:
    print(
        f"partition {p.id}: GPU {p.device} ({p.device_uuid}), "
        f"{p.memory_fraction:.0%} = {format_bytes(p.memory_bytes)}, owner {p.user}"
    )
    print(
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}  "
        f"framework soft cap={os.environ.get('CHRONOS_SOFT_LIMIT_BYTES', 'not set')} bytes"
    )
    for epoch in range(epochs):
        time.sleep(0.2)  # one "epoch" of work
        print(f"epoch {epoch} done, {p.time_remaining:.0f} s left")
        if p.time_remaining < 600:
            print("less than 10 minutes left: checkpoint and stop")
            break


if __name__ == "__main__":
    client = Partitioner()
    inside = os.environ.get("CHRONOS_PARTITION_ID")
    if inside:
        train(client.get(inside))
    else:
        with client.create(device=0, memory=0.5, duration=3600) as partition:
            train(partition)
