"""Storage groups: disjoint shares of a schedule's window for hosts on one storage.

No coordinator and no messages: every member computes the same layout from the same
member list. The members are put in a ring order by a stable hash of (group, member),
which does not depend on how an inventory happens to list them. Member ``r`` of ``n``
owns the circular stretch of the window that starts at ``frac(r * at_once / n)`` and is
``at_once / n`` of it long. Those stretches tile the window exactly ``at_once`` times
over, so at any moment exactly ``at_once`` members are inside their share.

Adding or removing one member keeps the ring order of all the others, so each share
moves by less than one share's length and still overlaps where it was; a rank taken
modulo ``n`` (rendezvous or list position) would move most members instead.

Inside its share a member lays its guests out in a stable hash order of their UUIDs,
each with room in proportion to its last trim's duration, so that its sweep fills the
share and ends with it (see slot_offsets).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from virt_trimd.config.model import StorageGroupConfig
from virt_trimd.engine.schedule import spread_offset

__all__ = [
    "StorageSlot",
    "SweepLayout",
    "group_warnings",
    "members_digest",
    "overrun_seconds",
    "ring_order",
    "slot_of",
    "slot_offsets",
    "sweep_offsets",
]


def _fraction(*parts: str) -> float:
    """A stable number in [0, 1) from the parts (SHA-256, not Python's salted hash())."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class StorageSlot:
    """One member's share of every window of a storage group, as fractions of the window."""

    group: str
    index: int  # position in the ring order, 0-based
    members: int
    at_once: int
    start_fraction: float
    length_fraction: float  # 1.0 when at_once >= members: the whole window

    def seconds(self, window_seconds: float) -> tuple[float, float]:
        """(start, length) of the share inside a window of ``window_seconds``."""
        return self.start_fraction * window_seconds, self.length_fraction * window_seconds


def ring_order(group: str, members: Iterable[str]) -> list[str]:
    """The members, deduplicated, in the group's stable hash order."""
    return sorted(set(members), key=lambda m: (_fraction("storage-group", group, m), m))


def members_digest(members: Iterable[str]) -> str:
    """A short fingerprint of the member set; equal on hosts whose inventories agree."""
    text = "\n".join(sorted(set(members)))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slot_of(group: StorageGroupConfig, host: str) -> StorageSlot | None:
    """``host``'s share of the group's windows, or None when it is not a member."""
    if not group.members:
        return None
    order = ring_order(group.label, group.members)
    if host not in order:
        return None
    n = len(order)
    index = order.index(host)
    length = min(1.0, group.at_once / n)
    start = 0.0 if length >= 1.0 else (index * group.at_once / n) % 1.0
    return StorageSlot(group.label, index, n, group.at_once, start, length)


@dataclass(frozen=True)
class SweepLayout:
    """What placing one sweep's guests needs: who, which schedule, which guests, how long.

    ``expected_seconds`` maps UUIDs to their last trim's duration (the daemon's
    last_duration); guests missing from it have no history yet.
    """

    hostname: str
    schedule: str
    uuids: Sequence[str]
    window_seconds: float
    expected_seconds: Mapping[str, float] = field(default_factory=dict)


def slot_offsets(slot: StorageSlot, layout: SweepLayout) -> dict[str, float]:
    """Start offset, in seconds into the window, of each guest (by UUID) in ``slot``.

    The guests are ordered by a hash of (host, schedule, UUID) and laid out from the
    share's start, each given room in proportion to its expected duration (its last
    trim; guests never trimmed count as this host's average, and with no history at
    all every guest gets the same room), scaled so that the layout fills the share
    exactly. Even spacing would let a long trim run into the next one and the last
    trims into the next member's share. A host with more work than its share
    compresses the layout, so its trims overlap up to the schedule's concurrency
    rather than spill over; beyond that they queue (see overrun_seconds). A share that
    runs past the window's end continues at its start, which another member left free.
    """
    window = layout.window_seconds
    if window <= 0 or not layout.uuids:
        return dict.fromkeys(layout.uuids, 0.0)
    start, length = slot.seconds(window)
    ordered = sorted(
        set(layout.uuids), key=lambda u: (_fraction(layout.hostname, layout.schedule, u), u)
    )
    expected = layout.expected_seconds
    known = [s for u in ordered if (s := expected.get(u)) is not None and s > 0]
    fallback = sum(known) / len(known) if known else 1.0
    # A zero-second trim still gets a start of its own.
    weights = [max(expected.get(u) or fallback, 1e-3) for u in ordered]
    stretch = length / sum(weights)
    offsets: dict[str, float] = {}
    elapsed = 0.0
    for uuid, weight in zip(ordered, weights, strict=True):
        offsets[uuid] = (start + elapsed * stretch) % window
        elapsed += weight
    return offsets


def overrun_seconds(slot: StorageSlot, layout: SweepLayout, concurrency: int = 1) -> float:
    """How much longer than its share this host's sweep is expected to take (0 if it fits)."""
    work = sum(layout.expected_seconds.get(u, 0.0) for u in layout.uuids) / max(1, concurrency)
    return max(0.0, work - slot.seconds(layout.window_seconds)[1])


def sweep_offsets(
    group: StorageGroupConfig, layout: SweepLayout
) -> tuple[StorageSlot | None, dict[str, float]]:
    """Every guest's start offset for one sweep, and the share it came from.

    The one rule the daemon and the fleet simulation both use: a member of the group
    places its guests in its share; any other host spreads each guest by its own hash
    over the whole window (spread_offset), as without a group. ``layout.hostname``
    seeds the per-guest hashes; ``group.host`` (when set) is the name looked up in
    members.
    """
    window = layout.window_seconds
    slot = slot_of(group, group.host or layout.hostname) if window > 0 else None
    if slot is not None:
        return slot, slot_offsets(slot, layout)
    return None, {
        u: spread_offset(layout.hostname, layout.schedule, u, window) for u in layout.uuids
    }


def group_warnings(group: StorageGroupConfig, host: str) -> list[str]:
    """What check-config should say about this host's view of its storage group.

    Only what one host can see: whether it is a member, names that are probably the
    same host twice, and an at_once that leaves nothing to separate. Inventories that
    disagree between hosts show in the virt_trimd_storage_group_info metric instead.
    """
    if not group.members:
        return []
    warnings: list[str] = []
    if host not in group.members:
        warnings.append(
            f"storage_group {group.label}: this host ({host!r}) is not in members, so it "
            "spreads its guests over the whole window as if there were no group; set "
            "storage_group.host to its name in members"
        )
    seen: dict[str, str] = {}
    for member in dict.fromkeys(group.members):
        short = member.split(".", 1)[0].lower()
        if short in seen:
            warnings.append(
                f"storage_group {group.label}: {seen[short]!r} and {member!r} look like the "
                "same host listed twice; each name gets its own share, so the host would "
                "trim in one while the other stays empty"
            )
        else:
            seen[short] = member
    if len(group.members) != len(set(group.members)):
        warnings.append(f"storage_group {group.label}: members lists a name more than once")
    if group.at_once >= len(set(group.members)) > 1:
        warnings.append(
            f"storage_group {group.label}: at_once {group.at_once} is not less than the "
            f"{len(set(group.members))} members, so every member may trim at any time"
        )
    return warnings
