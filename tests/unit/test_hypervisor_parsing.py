"""Pure parts of the libvirt adapter: error mapping and untrusted agent replies."""

from __future__ import annotations

import json

import libvirt
import pytest

from virt_trimd.host.agent import (
    ALLOWED_AGENT_COMMANDS,
    AgentCommandRefused,
    HypervisorError,
    Outcome,
    parse_agent_reply,
    parse_fstrim_return,
    parse_guest_filesystems,
)
from virt_trimd.host.hypervisor import Hypervisor, classify


def _err(code: int, domain: int = libvirt.VIR_FROM_QEMU) -> libvirt.libvirtError:
    exc = libvirt.libvirtError("boom")
    exc.err = (code, domain, "boom", 2, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "domain", "outcome"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, Outcome.NO_DOMAIN),
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, Outcome.NOT_RUNNING),
        (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_FROM_QEMU, Outcome.AGENT_UNAVAILABLE),
        (libvirt.VIR_ERR_AGENT_UNSYNCED, libvirt.VIR_FROM_QEMU, Outcome.AGENT_UNAVAILABLE),
        (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, Outcome.TIMEOUT),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, Outcome.CONNECTION),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, Outcome.CONNECTION),
        (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_QEMU, Outcome.UNSUPPORTED),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, Outcome.ERROR),
    ],
)
def test_classify(code: int, domain: int, outcome: Outcome) -> None:
    assert classify(_err(code, domain)) is outcome


def test_fstrim_reply_linux_windows_and_errors() -> None:
    ret = {
        "paths": [
            {"path": "/", "trimmed": 209715200, "minimum": 0},
            {"path": "/boot", "error": "trim not supported"},
            {"path": "C:\\"},  # Windows: no 'trimmed'
        ]
    }
    fs = parse_fstrim_return(ret)
    assert [(f.mountpoint, f.trimmed_bytes, f.error) for f in fs] == [
        ("/", 209715200, None),
        ("/boot", None, "trim not supported"),
        ("C:\\", None, None),
    ]


@pytest.mark.parametrize("bad", [-1, "12", 1.5, True, 1 << 70, [1]])
def test_fstrim_reply_absurd_numbers_become_errors(bad: object) -> None:
    (fs,) = parse_fstrim_return({"paths": [{"path": "/", "trimmed": bad}]})
    assert fs.trimmed_bytes is None and fs.error and "implausible" in fs.error


@pytest.mark.parametrize("ret", [None, [], {"paths": "x"}, {}, "paths"])
def test_fstrim_reply_without_paths_is_an_error(ret: object) -> None:
    with pytest.raises(HypervisorError):
        parse_fstrim_return(ret)


def test_fstrim_reply_non_dict_entries_and_long_names() -> None:
    fs = parse_fstrim_return({"paths": [42, {"path": "x" * 100000, "trimmed": 0}]})
    assert fs[0].error and fs[1].trimmed_bytes == 0 and len(fs[1].mountpoint) == 4096


@pytest.mark.parametrize(
    "reply", ["not json", json.dumps([1]), json.dumps({"error": {}}), "x" * (2 << 20)]
)
def test_agent_reply_untrusted(reply: str) -> None:
    with pytest.raises(HypervisorError):
        parse_agent_reply("guest-fstrim", reply)


def test_guest_filesystems_decoding() -> None:
    info = {
        "fs.count": 3,
        "fs.0.mountpoint": "/",
        "fs.0.fstype": "ext4",
        "fs.0.used-bytes": 1000,
        "fs.0.total-bytes": 5000,
        "fs.0.disk.count": 1,
        "fs.0.disk.0.alias": "sda",
        "fs.1.mountpoint": "/data",
        "fs.1.disk.count": 2,
        "fs.1.disk.0.alias": "vdb",
        "fs.1.disk.1.alias": "vdc",
        "fs.1.used-bytes": -5,
        "fs.2.mountpoint": "/x",
    }
    fss = parse_guest_filesystems(info)
    assert [(f.mountpoint, f.disks, f.used_bytes) for f in fss] == [
        ("/", ("sda",), 1000),
        ("/data", ("vdb", "vdc"), None),
        ("/x", (), None),
    ]
    assert parse_guest_filesystems({"fs.count": 1 << 40}) != []  # capped, not a hang
    assert parse_guest_filesystems(None) == []


def test_only_read_only_and_trim_commands_are_allowed() -> None:
    assert {
        "guest-ping",
        "guest-info",
        "guest-fstrim",
        "guest-get-fsinfo",
    } == ALLOWED_AGENT_COMMANDS
    hv = Hypervisor("test:///default")
    for cmd in (
        "guest-exec",
        "guest-file-open",
        "guest-file-write",
        "guest-shutdown",
        "guest-set-user-password",
        "guest-fsfreeze-freeze",
    ):
        with pytest.raises(AgentCommandRefused):
            hv.agent_command("any-uuid", cmd, None, 1)


def test_listing_with_libvirt_test_driver() -> None:
    hv = Hypervisor("test:///default")
    hv.connect()
    try:
        doms = hv.list_domains()
        assert [d.name for d in doms] == ["test"]
        (dom,) = doms
        assert dom.running and not dom.agent.configured
        assert hv.domain("test").uuid == dom.uuid
        with pytest.raises(HypervisorError) as err:
            hv.domain("no-such-domain")
        assert err.value.outcome is Outcome.NO_DOMAIN
    finally:
        hv.close()
