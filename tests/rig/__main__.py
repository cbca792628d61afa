"""`PYTHONPATH=tests python3 -m rig {build,up,down,list}`: drive the rig by hand or from make."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import cast, get_args

from rig.guests import (
    AgentMode,
    Bus,
    Discard,
    DiskSpec,
    GuestSpec,
    cleanup_test_domains,
    destroy_guest,
    guest_owner,
    start_guests,
)
from rig.host import (
    LIBVIRT_URI,
    TEST_PREFIX,
    RigError,
    default_cache_dir,
    ensure_libvirtd,
    quiet_libvirt_errors,
)
from rig.images import ImageFormat, allocated_bytes
from rig.initramfs import build_boot_files

_DISK_HELP = (
    "FMT:BUS[:DISCARD[:GARBAGE_MIB[:SIZE_MIB]]], e.g. qcow2:scsi:unmap:200:1024; "
    "FMT qcow2|raw, BUS scsi|virtio|sata, DISCARD unmap|ignore|default (repeatable; "
    "default one qcow2:scsi:unmap:200:1024)"
)


def parse_disk(text: str) -> DiskSpec:
    """Parse a --disk value (see _DISK_HELP); raise argparse.ArgumentTypeError if malformed."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 5:
        raise argparse.ArgumentTypeError(f"--disk {text!r}: expected {_DISK_HELP}")
    fmt, bus = parts[0], parts[1]
    discard = parts[2] if len(parts) > 2 else "unmap"
    if fmt not in get_args(ImageFormat):
        raise argparse.ArgumentTypeError(f"--disk {text!r}: format must be qcow2 or raw")
    if bus not in get_args(Bus):
        raise argparse.ArgumentTypeError(f"--disk {text!r}: bus must be scsi, virtio or sata")
    if discard not in (*get_args(Discard), "default"):
        raise argparse.ArgumentTypeError(f"--disk {text!r}: discard must be unmap|ignore|default")
    try:
        garbage = int(parts[3]) if len(parts) > 3 else 200
        size = int(parts[4]) if len(parts) > 4 else 1024
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--disk {text!r}: sizes must be integers") from exc
    return DiskSpec(
        fmt=cast(ImageFormat, fmt),
        bus=cast(Bus, bus),
        discard=None if discard == "default" else cast(Discard, discard),
        garbage_mib=garbage,
        size_mib=size,
    )


def _strip_prefix(name: str) -> str:
    return name.removeprefix(TEST_PREFIX)


def _cmd_build(args: argparse.Namespace) -> int:
    boot = build_boot_files(args.cache)
    print(f"kernel {boot.kernel}\ninitrd {boot.initrd}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    import libvirt

    ensure_libvirtd()
    boot = build_boot_files(args.cache)
    disks = tuple(args.disk) if args.disk else (DiskSpec(),)
    specs = [
        GuestSpec(name=_strip_prefix(n), disks=disks, agent=args.agent, memory_mib=args.memory)
        for n in args.names
    ]
    workdir = args.workdir or args.cache / "guests"
    conn = libvirt.open(LIBVIRT_URI)
    try:
        t0 = time.monotonic()
        handles = start_guests(conn, specs, workdir, boot, timeout_s=args.timeout, owner="cli")
        took = time.monotonic() - t0
        for h in handles:
            print(f"{h.name}: up ({took:.1f}s, agent {h.spec.agent}), console {h.console_log}")
            for img in h.images:
                print(f"  {img} allocated {allocated_bytes(img)} bytes")
    finally:
        conn.close()
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    import libvirt

    ensure_libvirtd()
    conn = libvirt.open(LIBVIRT_URI)
    try:
        if args.names:
            for n in args.names:
                destroy_guest(conn, TEST_PREFIX + _strip_prefix(n), force=args.all)
            gone = [TEST_PREFIX + _strip_prefix(n) for n in args.names]
        else:
            gone = cleanup_test_domains(conn, include_cli=True, include_live=args.all)
    finally:
        conn.close()
    print("removed: " + (" ".join(gone) if gone else "nothing"))
    return 0


def _cmd_list(_args: argparse.Namespace) -> int:
    import libvirt

    ensure_libvirtd()
    conn = libvirt.open(LIBVIRT_URI)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(TEST_PREFIX):
                state = "running" if dom.isActive() else "stopped"
                print(f"{dom.name()} {state} owner={guest_owner(dom)}")
    finally:
        conn.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for RigError)."""
    p = argparse.ArgumentParser(prog="python -m rig", description=__doc__)
    p.add_argument(
        "--cache", type=Path, default=default_cache_dir(), help="cache dir ($VTRIMD_RIG_CACHE)"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the guest kernel+initramfs into the cache")
    up = sub.add_parser("up", help=f"start guests named {TEST_PREFIX}NAME and wait for them")
    up.add_argument("names", nargs="+", metavar="NAME")
    up.add_argument("--disk", type=parse_disk, action="append", help=_DISK_HELP)
    up.add_argument("--agent", choices=get_args(AgentMode), default="running")
    up.add_argument("--memory", type=int, default=256, help="guest memory in MiB")
    up.add_argument("--workdir", type=Path, help="where images go (default CACHE/guests)")
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait per guest")
    down = sub.add_parser(
        "down", help="destroy rig guests: NAMEs, else those from `up` and dead test sessions"
    )
    down.add_argument("names", nargs="*", metavar="NAME")
    down.add_argument("--all", action="store_true", help="also guests of running test sessions")
    sub.add_parser("list", help="list rig domains")
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    quiet_libvirt_errors()
    commands = {"build": _cmd_build, "up": _cmd_up, "down": _cmd_down, "list": _cmd_list}
    try:
        return commands[args.cmd](args)
    except RigError as exc:
        print(f"rig: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
