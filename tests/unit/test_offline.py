"""Offline reclaim logic: argv, disk guards, the order of checks, results; no libguestfs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from virt_trimd.config.model import ConfigError, OfflineConfig, parse_config
from virt_trimd.engine.offline import (
    HostImages,
    OfflineHooks,
    OfflineReclaimer,
    disk_refusal,
    serve_helper_request,
)
from virt_trimd.engine.trim import DomainTrimmer, TrimOptions
from virt_trimd.host.measure import Measurer
from virt_trimd.host.sparsify import (
    ImageFacts,
    OfflineState,
    SparsifyError,
    SparsifyRun,
    helper_reply,
    helper_request,
    parse_helper_reply,
    parse_helper_request,
    parse_trimmed,
    run_via_helper,
    sparsify_argv,
    sparsify_environment,
    systemd_run_argv,
    use_helper,
    use_systemd_run,
)
from virt_trimd.records import (
    AgentChannel,
    Disk,
    DomainInfo,
    Method,
    QemuImgLimits,
    Result,
    SparsifyLimits,
    TrimRecord,
)


def _disk(path: str, fmt: str | None = "qcow2", target: str = "vda", **kw: Any) -> Disk:
    fields: dict[str, Any] = {
        "target": target,
        "bus": "virtio",
        "device": "disk",
        "source_type": "file",
        "source_path": path,
        "driver_format": fmt,
        "discard": "unmap",
        "detect_zeroes": None,
    }
    fields.update(kw)
    return Disk(**fields)


def _facts(ino: int = 1, **kw: Any) -> ImageFacts:
    return ImageFacts(file_id=(1, ino), is_regular=True, qcow2=True, **kw)


NOBODY = HostImages(users={}, backing_of={})


def test_argv_always_names_the_format_and_ends_options() -> None:
    argv = sparsify_argv("/usr/bin/virt-sparsify", "-weird.qcow2", "qcow2")
    assert argv == (
        "/usr/bin/virt-sparsify",
        "--in-place",
        "--format",
        "qcow2",
        "--",
        "-weird.qcow2",
    )


def test_environment_adds_the_operators_libguestfs_settings() -> None:
    limits = SparsifyLimits(environment=(("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),))
    env = sparsify_environment({"PATH": "/bin"}, limits)
    assert env == {"PATH": "/bin", "LC_ALL": "C", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def test_trimmed_lines_are_parsed() -> None:
    out = "[  20.9] Trimming /dev/sda\n[  21.0] Trimming /dev/sdb1\n[  21.2] Sparsify in-place done"
    assert parse_trimmed(out) == ("/dev/sda", "/dev/sdb1")
    assert parse_trimmed("[  21.2] Sparsify in-place operation completed") == ()


@pytest.mark.parametrize(
    ("disk", "facts", "reason"),
    [
        (_disk("/i", source_type="block"), _facts(), "block disk"),
        (_disk("/i", fmt="vmdk"), _facts(), "format vmdk"),
        (_disk("/i", fmt=None), _facts(), "never guessed"),
        (_disk("/i", readonly=True), _facts(), "read-only"),
        (_disk("/i", shareable=True), _facts(), "shareable"),
        (_disk("/i"), None, "cannot be read"),
        (_disk("/i"), _facts(backing_file="base.qcow2"), "overlay"),
        (_disk("/i", backing_chain=("/b",)), _facts(), "overlay"),
        (_disk("/i"), _facts(snapshots=2), "2 internal snapshot"),
        (_disk("/i"), _facts(encrypted=True), "encrypted"),
        (_disk("/i"), _facts(external_data_file=True), "external data file"),
        (_disk("/i"), replace(_facts(), qcow2=False), "no qcow2 header"),
    ],
)
def test_disk_refusals(disk: Disk, facts: ImageFacts | None, reason: str) -> None:
    refusal = disk_refusal("web", disk, facts, NOBODY)
    assert refusal is not None and reason in refusal


def test_sharing_and_backing_refusals_name_the_others() -> None:
    images = HostImages(users={(1, 1): {"web", "db"}}, backing_of={(1, 2): {"/v/o.qcow2"}})
    assert "domain(s) db" in str(disk_refusal("web", _disk("/i"), _facts(1), images))
    assert "backing file of /v/o.qcow2" in str(disk_refusal("web", _disk("/j"), _facts(2), images))
    assert disk_refusal("web", _disk("/k"), _facts(3), images) is None
    # A raw disk has no header to read and is not refused for it.
    raw = ImageFacts(file_id=(1, 4), is_regular=True, qcow2=False)
    assert disk_refusal("web", _disk("/r", fmt="raw"), raw, images) is None


class FakeHypervisor:
    def __init__(self, domains: list[DomainInfo], states: list[OfflineState]) -> None:
        self.domains = domains
        self.states = states  # one per offline_state call; the last repeats

    def list_domains(self) -> list[DomainInfo]:
        return self.domains

    def offline_state(self, uuid: str) -> OfflineState:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


OFF = OfflineState(active=False, state="shutoff", managed_save=False, persistent=True)
ON = replace(OFF, active=True, state="running")


def _domain(tmp_path: Path, n: int = 1, running: bool = False) -> DomainInfo:
    disks = []
    for i in range(n):
        img = tmp_path / f"d{i}.raw"
        with img.open("wb") as fh:
            fh.write(os.urandom(1 << 20))
        disks.append(_disk(str(img), fmt="raw", target=f"vd{'abc'[i]}"))
    return DomainInfo("web", "u-web", running, tuple(disks), AgentChannel(False, None))


def _reclaimer(
    hv: FakeHypervisor, runs: list[str], lock: str | None = None, fail: str | None = None
) -> OfflineReclaimer:
    def runner(path: str, fmt: str, limits: SparsifyLimits, qi: QemuImgLimits) -> SparsifyRun:
        runs.append(path)
        if fail is not None:
            raise SparsifyError(fail, f"{fail}!")
        # What a real sparsify does to a raw file: punch the blocks out.
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.truncate(1 << 20)
        return SparsifyRun(elapsed_seconds=1.0, trimmed=("/dev/sda",))

    hooks = OfflineHooks(runner=runner, lock_probe=lambda p, f, lim: lock)
    trimmer = DomainTrimmer(hv, Measurer())  # type: ignore[arg-type]
    return OfflineReclaimer(hv, trimmer, OfflineConfig(), hooks)  # type: ignore[arg-type]


def test_a_shut_off_domain_is_sparsified_and_measured(tmp_path: Path) -> None:
    dom = _domain(tmp_path)
    runs: list[str] = []
    rec = _reclaimer(FakeHypervisor([dom], [OFF]), runs).trim(dom, TrimOptions())
    assert rec.result is Result.SUCCESS and rec.method is Method.SPARSIFY
    assert rec.reclaimed_bytes == 1 << 20
    assert runs == [dom.disks[0].source_path]


def test_running_paused_or_managed_saved_domains_are_never_touched(tmp_path: Path) -> None:
    runs: list[str] = []
    dom = _domain(tmp_path)
    running = replace(dom, running=True)
    assert _reclaimer(FakeHypervisor([dom], [OFF]), runs).trim(running, TrimOptions()).result is (
        Result.SKIPPED
    )
    paused = replace(ON, state="paused")
    rec = _reclaimer(FakeHypervisor([dom], [paused]), runs).trim(dom, TrimOptions())
    assert rec.result is Result.SKIPPED and "paused" in rec.message
    saved = replace(OFF, managed_save=True)
    rec = _reclaimer(FakeHypervisor([dom], [saved]), runs).trim(dom, TrimOptions())
    assert rec.result is Result.SKIPPED and "managed save" in rec.message
    assert runs == []


def test_state_is_rechecked_before_each_disk(tmp_path: Path) -> None:
    dom = _domain(tmp_path, n=2)
    runs: list[str] = []
    # Picked shut off, still off before disk 1, started before disk 2.
    hv = FakeHypervisor([dom], [OFF, OFF, ON])
    rec = _reclaimer(hv, runs).trim(dom, TrimOptions())
    assert runs == [dom.disks[0].source_path]
    assert rec.result is Result.PARTIAL and "running now" in rec.message
    assert rec.disks[1].not_measured is not None and "running now" in rec.disks[1].not_measured


def test_a_held_image_lock_skips_the_disk(tmp_path: Path) -> None:
    dom = _domain(tmp_path)
    runs: list[str] = []
    rec = _reclaimer(FakeHypervisor([dom], [OFF]), runs, lock='Failed to get "write" lock').trim(
        dom, TrimOptions()
    )
    assert runs == [] and rec.result is Result.ERROR and "in use by another process" in rec.message


def test_dry_run_checks_and_writes_nothing(tmp_path: Path) -> None:
    dom = _domain(tmp_path)
    runs: list[str] = []
    rec = _reclaimer(FakeHypervisor([dom], [OFF]), runs).trim(dom, TrimOptions(dry_run=True))
    assert runs == [] and rec.result is Result.SKIPPED and "dry run" in rec.message


def test_a_missing_tool_and_a_timeout_are_results(tmp_path: Path) -> None:
    dom = _domain(tmp_path)
    rec = _reclaimer(FakeHypervisor([dom], [OFF]), [], fail="missing").trim(dom, TrimOptions())
    assert rec.result is Result.ERROR
    rec = _reclaimer(FakeHypervisor([dom], [OFF]), [], fail="timeout").trim(dom, TrimOptions())
    assert rec.result is Result.TIMEOUT


def test_config_offline_section_and_schedule_flag() -> None:
    config = parse_config(
        "offline: {environment: [LIBGUESTFS_BACKEND_SETTINGS=force_tcg], concurrency: 2}\n"
        "schedules: [{name: a, every: 1h, offline: true}]\n"
    )
    assert config.offline.limits.environment == (("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),)
    assert config.offline.concurrency == 2 and config.schedules[0].offline
    assert not parse_config("schedules: [{name: a, every: 1h}]").schedules[0].offline
    with pytest.raises(ConfigError, match=r"offline\.environment"):
        parse_config("offline: {environment: [LD_PRELOAD=/x.so]}")


def test_records_round_trip_method_and_trigger() -> None:
    rec = TrimRecord(
        "web", "u", Result.SUCCESS, "", "2026-01-01T00:00:00Z", 1.0,
        method=Method.SPARSIFY, trigger="growth",
    )  # fmt: skip
    back = TrimRecord.from_dict(rec.to_dict())
    assert back == rec
    old = rec.to_dict()
    del old["method"], old["trigger"]
    assert TrimRecord.from_dict(old).method is Method.AGENT


def test_systemd_run_argv_bounds_the_transient_unit() -> None:
    limits = SparsifyLimits(
        timeout_seconds=600, memory_bytes=1 << 31, environment=(("LIBGUESTFS_DEBUG", "1"),)
    )
    argv = systemd_run_argv("virt-trimd-sparsify-1-1", ("virt-sparsify", "--in-place"), limits)
    assert argv[:5] == ("systemd-run", "--wait", "--pipe", "--collect", "--service-type=exec")
    assert "--setenv=LIBGUESTFS_DEBUG=1" in argv and "--setenv=LC_ALL=C" in argv
    props = {argv[i + 1] for i, a in enumerate(argv) if a == "-p"}
    assert {"MemoryMax=2147483648", "RuntimeMaxSec=600", "PrivateTmp=yes"} <= props
    assert argv[-3:] == ("--", "virt-sparsify", "--in-place")


def test_runner_choice() -> None:
    assert use_systemd_run(SparsifyLimits(runner="systemd-run"), {})
    assert not use_systemd_run(SparsifyLimits(runner="subprocess"), {"INVOCATION_ID": "x"})
    # auto outside a systemd service (no INVOCATION_ID): a plain child process.
    assert not use_systemd_run(SparsifyLimits(), {})
    config = parse_config("offline: {runner: subprocess, memory: 1GiB}")
    assert config.offline.limits.runner == "subprocess"
    assert config.offline.limits.memory_bytes == 1 << 30


def test_an_image_not_written_since_its_last_sparsify_is_not_booted_again(tmp_path: Path) -> None:
    dom = _domain(tmp_path)
    runs: list[str] = []
    reclaimer = _reclaimer(FakeHypervisor([dom], [OFF]), runs)
    assert reclaimer.trim(dom, TrimOptions()).result is Result.SUCCESS
    again = reclaimer.trim(dom, TrimOptions())
    assert again.result is Result.SKIPPED and "unchanged since" in again.message
    assert len(runs) == 1
    path = Path(str(dom.disks[0].source_path))
    with path.open("r+b") as fh:  # the guest ran and wrote
        fh.write(os.urandom(4096))
    assert reclaimer.trim(dom, TrimOptions()).result is Result.SUCCESS
    assert len(runs) == 2


def test_systemd_run_keeps_the_appliance_cache_and_the_modules_readable() -> None:
    argv = systemd_run_argv("u", ("virt-sparsify",), SparsifyLimits())
    props = {argv[i + 1] for i, a in enumerate(argv) if a == "-p"}
    assert "CacheDirectory=virt-trimd-guestfs" in props
    assert "--setenv=LIBGUESTFS_CACHEDIR=/var/cache/virt-trimd-guestfs" in argv
    # supermin copies /usr/lib/modules into the appliance: it must stay visible.
    assert "ProtectKernelModules=yes" not in props
    own = SparsifyLimits(environment=(("LIBGUESTFS_CACHEDIR", "/srv/cache"),))
    argv = systemd_run_argv("u", ("virt-sparsify",), own)
    assert not any(a.startswith("CacheDirectory=") for a in argv)
    assert "--setenv=LIBGUESTFS_CACHEDIR=/srv/cache" in argv


def test_helper_runner_choice() -> None:
    assert use_helper(SparsifyLimits(runner="helper"), {})
    assert not use_helper(SparsifyLimits(runner="systemd-run"), {"INVOCATION_ID": "x"})
    assert not use_helper(SparsifyLimits(), {})  # auto outside systemd: a child process
    assert not use_systemd_run(SparsifyLimits(runner="helper"), {"INVOCATION_ID": "x"})
    assert parse_config("offline: {runner: helper}").offline.limits.runner == "helper"


def test_helper_protocol_round_trips_and_rejects_garbage() -> None:
    assert parse_helper_request(helper_request("/i/a.qcow2", "qcow2")) == ("/i/a.qcow2", "qcow2")
    for bad in (b"{}", b"[1]", b'{"path": "rel", "format": "raw"}',
                b'{"path": "/a", "format": "vmdk"}', b'{"path": "/a", "format": "raw", "x": 1}',
                b"x" * 9000):  # fmt: skip
        with pytest.raises(ValueError):
            parse_helper_request(bad)
    run = parse_helper_reply(helper_reply(SparsifyRun(elapsed_seconds=2.5, trimmed=("/dev/sda",))))
    assert run == SparsifyRun(elapsed_seconds=2.5, trimmed=("/dev/sda",))
    with pytest.raises(SparsifyError) as err:
        parse_helper_reply(helper_reply(SparsifyError("refused", "no")))
    assert (err.value.kind, err.value.message) == ("refused", "no")
    with pytest.raises(SparsifyError) as err:
        parse_helper_reply(b"not json")
    assert err.value.kind == "failed"


def test_an_unreachable_helper_is_a_clear_failure(tmp_path: Path) -> None:
    with pytest.raises(SparsifyError) as err:
        run_via_helper("/i/a.qcow2", "qcow2", SparsifyLimits(), str(tmp_path / "none.sock"))
    assert err.value.kind == "failed" and "virt-trimd-sparsify.socket" in err.value.message


def _serve(hv: FakeHypervisor, path: str, fmt: str, runs: list[str]) -> SparsifyRun:
    def runner(p: str, f: str, limits: SparsifyLimits, qi: QemuImgLimits) -> SparsifyRun:
        runs.append(p)
        return SparsifyRun(elapsed_seconds=1.0, trimmed=())

    hooks = OfflineHooks(runner=runner, lock_probe=lambda p, f, lim: None)
    return serve_helper_request(
        hv,  # type: ignore[arg-type]
        path,
        fmt,
        SparsifyLimits(),
        QemuImgLimits(),
        hooks=hooks,
    )


def test_the_helper_rechecks_everything_it_is_asked(tmp_path: Path) -> None:
    dom = _domain(tmp_path)
    path = str(dom.disks[0].source_path)
    runs: list[str] = []
    assert _serve(FakeHypervisor([dom], [OFF]), path, "raw", runs).elapsed_seconds == 1.0
    refusals = {
        "not a disk of exactly one": (FakeHypervisor([], [OFF]), path, "raw"),
        "says raw, not qcow2": (FakeHypervisor([dom], [OFF]), path, "qcow2"),
        "is paused": (FakeHypervisor([dom], [replace(ON, state="paused")]), path, "raw"),
        "managed save": (FakeHypervisor([dom], [replace(OFF, managed_save=True)]), path, "raw"),
        "cannot be read": (FakeHypervisor([dom], [OFF]), str(tmp_path / "nope"), "raw"),
    }
    other = replace(dom, name="db", uuid="u-db")
    refusals["not a disk of exactly one defined domain (db, web)"] = (
        FakeHypervisor([dom, other], [OFF]),
        path,
        "raw",
    )
    for reason, (hv, p, fmt) in refusals.items():
        with pytest.raises(SparsifyError) as err:
            _serve(hv, p, fmt, runs)
        assert err.value.kind == "refused" and reason in err.value.message, (reason, err.value)
    assert runs == [path]


def test_the_helper_runs_on_the_xml_path_not_the_one_asked(tmp_path: Path) -> None:
    # A symlink the (untrusted) daemon made passes the identity check, but could be
    # re-pointed after it: the run must use the domain's own path.
    dom = _domain(tmp_path)
    path = str(dom.disks[0].source_path)
    link = tmp_path / "link.raw"
    link.symlink_to(path)
    runs: list[str] = []
    _serve(FakeHypervisor([dom], [OFF]), str(link), "raw", runs)
    assert runs == [path]
