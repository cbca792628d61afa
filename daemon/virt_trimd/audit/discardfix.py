"""The fix behind `virt-trimd audit --enable-discard`: edit, diff and back up domain XML.

`enable_discard_xml` sets discard='unmap' on the disks of a persistent domain XML,
splicing the change into the original text; `unified_diff` shows the change and
`backup_xml` keeps the old definition (under a `safe_filename`) before it is replaced.
Which devices are skipped follows the audit's rules (`audit.SKIPPED_DEVICES`).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from xml.parsers import expat

from virt_trimd.audit.checks import SKIPPED_DEVICES
from virt_trimd.host.domxml import parse_domain_root

__all__ = ["backup_xml", "enable_discard_xml", "safe_filename", "unified_diff"]

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.discardfix")

_ENABLE_SOURCE_TYPES = frozenset({"file", "block", "volume"})
_DISK_PATH = ("domain", "devices", "disk")


@dataclass
class _DiskTags:
    """Where one <disk> and its children sit in the original bytes."""

    attrs: dict[str, str]
    start: int  # byte offset of '<disk'
    driver_start: int | None = None
    driver_attrs: dict[str, str] | None = None
    target: str | None = None
    readonly: bool = False


def _scan_disks(data: bytes) -> list[_DiskTags]:
    """Parse with expat and note the byte offsets of every domain/devices/disk and its driver."""
    # UTF-8 regardless of any declaration: the offsets index the bytes we encoded.
    parser = expat.ParserCreate(encoding="UTF-8")
    stack: list[str] = []
    disks: list[_DiskTags] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        stack.append(name)
        path = tuple(stack)
        if path == _DISK_PATH:
            disks.append(_DiskTags(attrs=dict(attrs), start=parser.CurrentByteIndex))
        elif path[:-1] == _DISK_PATH:
            disk = disks[-1]
            if name == "driver" and disk.driver_start is None:
                disk.driver_start = parser.CurrentByteIndex
                disk.driver_attrs = dict(attrs)
            elif name == "target":
                disk.target = attrs.get("dev")
            elif name == "readonly":
                disk.readonly = True

    def end(_name: str) -> None:
        stack.pop()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    return disks


def _tag_end(data: bytes, start: int) -> int:
    """Offset of the '>' closing the start tag at `start` ('>' may sit inside quotes)."""
    quote = 0
    for i in range(start + 1, len(data)):
        c = data[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in b"'\"":
            quote = c
        elif c == ord(">"):
            return i
    raise ValueError("unterminated tag")


_DISCARD_ATTR = re.compile(rb"(\sdiscard\s*=\s*)(['\"])[^'\"]*\2")


def _set_discard(tag: bytes) -> bytes:
    """Return the start tag with discard='unmap', attribute added or its value replaced."""
    if _DISCARD_ATTR.search(tag):
        return _DISCARD_ATTR.sub(lambda m: m.group(1) + m.group(2) + b"unmap" + m.group(2), tag)
    body = tag[:-2] if tag.endswith(b"/>") else tag[:-1]
    close = tag[len(body) :]
    stripped = body.rstrip()
    return stripped + b" discard='unmap'" + body[len(stripped) :] + close


def enable_discard_xml(inactive_xml: str) -> tuple[str, list[str]]:
    """Set discard='unmap' on every file/block/volume disk of a persistent domain XML.

    Touches nothing else: buses stay as they are (a Windows guest whose boot disk moves to
    a bus it has no driver for fails to boot), cdrom/floppy and read-only disks are
    skipped, and a disk without <driver> gets <driver name='qemu' discard='unmap'/>.
    The edit is spliced into the original text at the offsets the XML parser reports, so
    everything else (quoting, namespaces, metadata, comments) stays byte for byte and a
    diff shows only the changed lines. Returns (new XML, targets changed).
    Raises ValueError when the text is not a domain document.
    """
    data = inactive_xml.encode("utf-8")
    parse_domain_root(inactive_xml)  # refuse what is not a domain document before editing it
    edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement), applied back to front
    changed: list[str] = []
    for disk in _scan_disks(data):
        if disk.attrs.get("device", "disk") in SKIPPED_DEVICES or disk.readonly:
            continue
        if disk.attrs.get("type", "") not in _ENABLE_SOURCE_TYPES:
            continue
        if disk.driver_start is not None:
            if (disk.driver_attrs or {}).get("discard") == "unmap":
                continue
            end = _tag_end(data, disk.driver_start) + 1
            edits.append((disk.driver_start, end, _set_discard(data[disk.driver_start : end])))
        else:
            disk_end = _tag_end(data, disk.start) + 1
            if data[disk_end - 2 : disk_end] == b"/>":
                continue  # an empty <disk/> has nothing to trim
            # libvirt writes <driver> first inside <disk>, indented one level deeper.
            line_start = data.rfind(b"\n", 0, disk.start) + 1
            indent = data[line_start : disk.start]
            indent = indent if not indent.strip() else b""
            new = b"\n" + indent + b"  <driver name='qemu' discard='unmap'/>"
            edits.append((disk_end, disk_end, new))
        changed.append(disk.target or "?")
    for start, end, replacement in sorted(edits, reverse=True):
        data = data[:start] + replacement + data[end:]
    return (data.decode("utf-8"), changed) if changed else (inactive_xml, [])


def unified_diff(old: str, new: str, name: str) -> str:
    """A `diff -u` of two XML texts, labelled with the domain name; "" when equal."""
    old_lines = [line if line.endswith("\n") else line + "\n" for line in old.splitlines(True)]
    new_lines = [line if line.endswith("\n") else line + "\n" for line in new.splitlines(True)]
    return "".join(
        difflib.unified_diff(old_lines, new_lines, fromfile=f"{name} (now)", tofile=f"{name} (new)")
    )


def safe_filename(name: str, limit: int = 80) -> str:
    """A file-name-safe rendering of a domain name, unique per name (hash suffix).

    Keeps ASCII letters, digits, '.', '_' and '-'; everything else ('/', spaces,
    unicode, leading dots) becomes '_'. The short hash keeps 'a/b' and 'a_b' apart.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", ascii_name).lstrip(".")[:limit] or "domain"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def backup_xml(state_dir: Path, domain: str, xml: str, now: datetime) -> Path:
    """Write `xml` to state_dir/xml-backups/<safe name>-<UTC timestamp>.xml and return it.

    The directory is 0700 and the file 0600: the inactive XML is read with
    VIR_DOMAIN_XML_SECURE and may hold VNC/SPICE passwords. Never overwrites: a second
    backup in the same second gets a -N suffix. `now` must be timezone-aware.
    Raises ValueError for a naive `now`, OSError when the backup cannot be written.
    """
    if now.tzinfo is None:
        raise ValueError("backup_xml needs a timezone-aware datetime")
    directory = state_dir / "xml-backups"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{directory} is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = f"{safe_filename(domain)}-{stamp}"
    data = xml.encode("utf-8")
    for n in range(1000):
        path = directory / (f"{base}.xml" if n == 0 else f"{base}-{n}.xml")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)  # the umask must not widen or narrow it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("backed up the XML of %s to %s", domain, path)
        return path
    raise OSError(f"cannot find a free backup file name for {base} in {directory}")
