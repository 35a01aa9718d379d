"""A create request's GPUs: named (one, or a group), or chosen by Chronos.

The service reads a :class:`~chronos.messages.CreateRequest`'s ``device``/``devices``/
``gpus`` through :func:`gpu_choice` once (bounds: no GPU twice, at most the machine's
count), and builds the ledger's request on the GPUs named (:func:`members`), or lets
:class:`Placer` choose them inside the admission transaction (:mod:`chronos.placement`
holds the rule). Memory is per GPU: a fraction is of each GPU, bytes are bytes on each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import combinations
from typing import NamedTuple

from chronos.devices import Device, Machine
from chronos.errors import BadRequest
from chronos.ledger import Member, NewPartition, Room
from chronos.messages import CreateRequest, Spec
from chronos.placement import Candidate, Placement, place
from chronos.refusals import NoPlacement, refusal
from chronos.units import parse_memory

AUTO = "auto"
Capacity = Callable[[int, int], int]
"""What admission may hand out on GPU ``index`` of ``total_bytes`` (the policy in force)."""


class GpuChoice(NamedTuple):
    """The GPUs a request names (in its order, the primary first), or how many to choose."""

    named: tuple[Device, ...]
    gpus: int

    @property
    def chosen_by_chronos(self) -> bool:
        return not self.named


def gpu_choice(ask: CreateRequest, machine: Machine) -> GpuChoice:
    """The request's GPUs, checked against the machine (one clear line if not)."""
    if ask.devices is not None and ask.gpus is not None:
        raise BadRequest("name the GPUs (devices) or ask for a number of them (gpus), not both")
    if isinstance(ask.device, str) and ask.device != AUTO:
        raise BadRequest(f"device must be a GPU index or {AUTO!r}, not {ask.device!r}")
    if ask.devices is not None:
        return GpuChoice(_named(ask.devices, machine), len(ask.devices))
    if ask.gpus is not None:
        _within_machine(ask.gpus, machine)
        return GpuChoice((), ask.gpus)
    if ask.device == AUTO:
        return GpuChoice((), 1)
    assert isinstance(ask.device, int)
    return GpuChoice((machine.device(ask.device),), 1)


def _named(indices: Sequence[int], machine: Machine) -> tuple[Device, ...]:
    _within_machine(len(indices), machine)
    seen: set[int] = set()
    for index in indices:
        if index in seen:
            raise BadRequest(f"GPU {index} is named twice")
        seen.add(index)
    return tuple(machine.device(i) for i in indices)


def _within_machine(count: int, machine: Machine) -> None:
    have = len(machine.devices)
    if not 1 <= count <= have:
        raise BadRequest(f"{count} GPUs asked for: this machine has {have}")


def members(devices: Sequence[Device], memory: Spec, capacity: Capacity) -> tuple[Member, ...]:
    """A request's share of each GPU (``memory`` per GPU, the primary first)."""
    return tuple(
        Member(
            d.index,
            d.uuid,
            d.total_bytes,
            capacity(d.index, d.total_bytes),
            parse_memory(memory, d.total_bytes),
        )
        for d in devices
    )


def on_members(template: NewPartition, chosen: Sequence[Member], why: str | None) -> NewPartition:
    """``template`` on the GPUs ``chosen`` (the first is the primary)."""
    first, *more = chosen
    return replace(
        template,
        device=first.device,
        device_uuid=first.device_uuid,
        device_total_bytes=first.device_total_bytes,
        capacity_bytes=first.capacity_bytes,
        memory_bytes=first.memory_bytes,
        more=tuple(more),
        placement=why,
    )


class Placer:
    """Chooses a request's GPUs inside the admission transaction (``Ledger.create``'s
    ``place``). ``placed``: the request on the GPUs chosen, once called (the service
    queues that one when ``wait`` and nothing has room now)."""

    def __init__(
        self,
        template: NewPartition,
        every_gpu: Sequence[Member],
        count: int,
        link_level: Callable[[int, int], int | None],
        will_queue: bool,
    ) -> None:
        self.template = template
        self.every_gpu = tuple(every_gpu)
        self.count = count
        self.link_level = link_level
        self.will_queue = will_queue
        self.placed: NewPartition | None = None

    def __call__(self, room: Room) -> NewPartition:
        by_index = {m.device: m for m in self.every_gpu}
        candidates = [
            Candidate(
                m.device,
                m.capacity_bytes,
                m.memory_bytes,
                room.peak(m.device_uuid),
                room.mine(m.device_uuid),
            )
            for m in self.every_gpu
        ]
        chosen = place(candidates, self.count, self.link_level)
        if chosen is None and self.will_queue:
            chosen = self._soonest(room, candidates)
        if chosen is None:
            fitting = sum(1 for c in candidates if c.fits)
            first = self.every_gpu[0]
            facts = NoPlacement(self.count, first.memory_bytes, fitting, room.start, room.now)
            raise refusal(facts)
        self.placed = on_members(
            self.template, [by_index[i] for i in chosen.devices], chosen.reason
        )
        return self.placed

    def _soonest(self, room: Room, candidates: Sequence[Candidate]) -> Placement | None:
        """For a request that will wait: the GPUs where it would start soonest (then by the
        rule, on an empty machine: links, then the lowest indices)."""
        by_index = {m.device: m for m in self.every_gpu}
        possible = [c for c in candidates if c.need_bytes <= c.capacity_bytes]
        best: tuple[float, tuple[int, ...]] | None = None
        for chosen in list(combinations(possible, self.count))[:2000]:
            devices = tuple(c.index for c in chosen)
            start = room.soonest(on_members(self.template, [by_index[i] for i in devices], None))
            if start is not None and (best is None or start < best[0]):
                best = (start, devices)
        if best is None:
            return None
        free = [replace(c, peak_bytes=0) for c in candidates if c.index in best[1]]
        ranked = place(free, self.count, self.link_level)
        devices = ranked.devices if ranked is not None else best[1]
        return Placement(devices, "queued on the GPUs where it starts soonest")
