"""KV-cache slots: one per running sequence, ``[slots, max_len]`` per layer on the device.

The scheduler owns slot ids; the runtime owns the tensors they index. A freed slot may keep
the tokens whose keys and values it still holds (:meth:`SlotPool.free` with ``held``), so a
later prompt that starts with them can skip computing them (prefix reuse); allocating the slot
forgets them.
"""

from __future__ import annotations


class SlotPool:
    """Free-list of slot ids ``0..num_slots-1``; lowest id first so reuse is deterministic (and
    a decode step, whose rows run up to the highest slot in use, stays compact)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives the lowest id
        self._held: dict[int, tuple[int, ...]] = {}  # free slot -> tokens whose KV it holds

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self, n: int = 1) -> bool:
        return len(self._free) >= n

    def allocate(self, slot: int | None = None) -> int:
        """The lowest free slot, or ``slot`` if it is free; what it held is forgotten."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        if slot is None:
            slot = self._free.pop()
        elif slot in self._free:
            self._free.remove(slot)
        else:
            raise ValueError(f"slot {slot} is not free")
        self._held.pop(slot, None)
        return slot

    def free(self, slot: int, held: tuple[int, ...] = ()) -> None:
        """Return ``slot``; ``held``: the tokens (from position 0) whose KV it keeps valid."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        self._free.sort(reverse=True)
        if held:
            self._held[slot] = held

    def held(self) -> dict[int, tuple[int, ...]]:
        """Free slots that still hold tokens, and those tokens."""
        return self._held

    def lowest_free(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        return self._free[-1]
