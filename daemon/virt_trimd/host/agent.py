"""The guest-agent protocol as data: commands allowed, outcomes, replies parsed.

Pure code, no libvirt import, so the engine, the CLI and their unit tests can use
`Outcome`, `HypervisorError` and `GuestFilesystem` without loading libvirt. Replies
come from the guest and are distrusted: sizes are capped, numbers bounded, text cut.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from virt_trimd.records import FilesystemResult

# The only agent commands virt-trimd ever sends. guest-exec, guest-file-* and
# anything else that changes a guest are refused here, at the boundary, so a bug
# elsewhere cannot turn the daemon into a remote shell.
ALLOWED_AGENT_COMMANDS = frozenset({"guest-ping", "guest-info", "guest-fstrim", "guest-get-fsinfo"})

# An agent reply larger than this is not a guest-fstrim reply we trust.
MAX_AGENT_REPLY_BYTES = 1 << 20
# Cap on filesystems we accept from one reply; a real guest has tens.
MAX_FILESYSTEMS = 4096
# A sane upper bound for any byte count a guest reports (1 EiB).
MAX_SANE_BYTES = 1 << 60


class Outcome(enum.StrEnum):
    """What went wrong, in terms the trim logic can act on."""

    AGENT_UNAVAILABLE = "agent_unavailable"
    TIMEOUT = "timeout"
    NOT_RUNNING = "not_running"
    NO_DOMAIN = "no_domain"
    CONNECTION = "connection"  # libvirtd gone or unreachable
    UNSUPPORTED = "unsupported"
    ERROR = "error"


class HypervisorError(Exception):
    """A libvirt call failed; `outcome` says how."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


class AgentCommandRefused(HypervisorError):
    """A caller tried to send a command outside ALLOWED_AGENT_COMMANDS."""


@dataclass(frozen=True)
class GuestFilesystem:
    """One filesystem as the guest agent reports it, mapped to libvirt disk targets."""

    mountpoint: str
    fstype: str | None
    disks: tuple[str, ...]  # libvirt target devs (e.g. "sda"), empty when unmapped
    used_bytes: int | None
    total_bytes: int | None


def parse_agent_reply(command: str, reply: Any) -> Any:
    """Parse the JSON text libvirt hands back; the guest controls it, so distrust it."""
    if not isinstance(reply, str):
        raise HypervisorError(Outcome.ERROR, f"{command}: agent reply is not text")
    if len(reply) > MAX_AGENT_REPLY_BYTES:
        raise HypervisorError(
            Outcome.ERROR, f"{command}: agent reply too large ({len(reply)} bytes)"
        )
    try:
        doc = json.loads(reply)
    except ValueError as exc:
        raise HypervisorError(Outcome.ERROR, f"{command}: agent reply is not JSON") from exc
    if not isinstance(doc, dict) or "return" not in doc:
        raise HypervisorError(Outcome.ERROR, f"{command}: agent reply has no 'return'")
    return doc["return"]


def _sane_int(value: Any) -> int | None:
    """An int in [0, 1 EiB], or None: guests may send strings, floats, negatives."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if value < 0 or value > MAX_SANE_BYTES:
        return None
    return value


def _clean_text(value: Any, limit: int = 4096) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:limit]


def parse_fstrim_return(ret: Any) -> tuple[FilesystemResult, ...]:
    """Turn guest-fstrim's `return` ({"paths": [...]}) into FilesystemResults.

    Windows guests omit `trimmed`; failing filesystems carry `error`. Anything
    malformed becomes an error entry rather than an exception.
    """
    if not isinstance(ret, dict) or not isinstance(ret.get("paths"), list):
        raise HypervisorError(Outcome.ERROR, "guest-fstrim: reply has no 'paths' list")
    out: list[FilesystemResult] = []
    for entry in ret["paths"][:MAX_FILESYSTEMS]:
        if not isinstance(entry, dict):
            out.append(
                FilesystemResult(
                    mountpoint="?", trimmed_bytes=None, error="malformed entry in agent reply"
                )
            )
            continue
        error = entry.get("error")
        trimmed = entry.get("trimmed")
        sane = _sane_int(trimmed)
        if trimmed is not None and sane is None and error is None:
            error = f"implausible 'trimmed' value from agent: {_clean_text(trimmed, 64)}"
        out.append(
            FilesystemResult(
                mountpoint=_clean_text(entry.get("path", "?")),
                trimmed_bytes=sane,
                error=_clean_text(error) if error is not None else None,
            )
        )
    return tuple(out)


def parse_guest_filesystems(info: Any) -> list[GuestFilesystem]:
    """Decode virDomainGetGuestInfo's flat `fs.N.*` typed parameters."""
    if not isinstance(info, dict):
        return []
    count = _sane_int(info.get("fs.count")) or 0
    out: list[GuestFilesystem] = []
    for i in range(min(count, MAX_FILESYSTEMS)):
        pre = f"fs.{i}."
        ndisks = _sane_int(info.get(pre + "disk.count")) or 0
        disks = tuple(
            str(info[pre + f"disk.{j}.alias"])
            for j in range(min(ndisks, 64))
            if isinstance(info.get(pre + f"disk.{j}.alias"), str)
        )
        fstype = info.get(pre + "fstype")
        out.append(
            GuestFilesystem(
                mountpoint=_clean_text(info.get(pre + "mountpoint", "?")),
                fstype=fstype if isinstance(fstype, str) else None,
                disks=disks,
                used_bytes=_sane_int(info.get(pre + "used-bytes")),
                total_bytes=_sane_int(info.get(pre + "total-bytes")),
            )
        )
    return out
