"""The libvirt adapter: the only module that imports libvirt.

It turns domains into `DomainInfo`, runs the few guest-agent commands virt-trimd
is allowed to send, and translates `libvirtError` into `HypervisorError` with a
small set of `Outcome` values the trim logic can act on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from virt_trimd.host.agent import (
    ALLOWED_AGENT_COMMANDS,
    AgentCommandRefused,
    GuestFilesystem,
    HypervisorError,
    Outcome,
    parse_agent_reply,
    parse_fstrim_return,
    parse_guest_filesystems,
)
from virt_trimd.host.domxml import DomainXMLError, parse_domain_xml
from virt_trimd.host.sparsify import OfflineState
from virt_trimd.records import DomainInfo, FilesystemResult

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.hypervisor")

T = TypeVar("T")


_AGENT_CODES = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED}
_CONNECTION_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_SYSTEM_ERROR}
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_UNSUPPORTED_CODES = {
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
}


def classify(exc: libvirt.libvirtError) -> Outcome:
    """Map a libvirtError to an Outcome (pure, so it is unit-testable)."""
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return Outcome.NO_DOMAIN
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        # "domain is not running" is the only OPERATION_INVALID our calls provoke.
        return Outcome.NOT_RUNNING
    if code in _AGENT_CODES:
        return Outcome.AGENT_UNAVAILABLE
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        # "cannot acquire state change lock": another job holds the domain.
        return Outcome.TIMEOUT
    if code in _CONNECTION_CODES or domain in _CONNECTION_DOMAINS:
        return Outcome.CONNECTION
    if code in _UNSUPPORTED_CODES:
        return Outcome.UNSUPPORTED
    return Outcome.ERROR


def _libvirt_error_message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()


def _silence_libvirt_stderr(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we log them ourselves."""


class Hypervisor:
    """A libvirt connection with the narrow interface virt-trimd needs.

    Thread-safe: libvirt connections may be shared across threads; reconnecting
    is serialised by a lock.
    """

    def __init__(self, uri: str, opener: Callable[[str], Any] | None = None) -> None:
        self.uri = uri
        self._opener = opener or libvirt.open
        self._conn: Any = None
        self._lock = threading.Lock()
        libvirt.registerErrorHandler(_silence_libvirt_stderr, None)

    # -- connection ----------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection if it is not open and alive; raises HypervisorError."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return
                except libvirt.libvirtError:
                    pass
                self._close_locked()
            try:
                self._conn = self._opener(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(
                    Outcome.CONNECTION,
                    f"cannot connect to {self.uri}: {_libvirt_error_message(exc)}",
                ) from exc
            log.info("connected to %s", self.uri)

    def is_alive(self) -> bool:
        """True when the connection is open and libvirtd answers."""
        conn = self._conn
        if conn is None:
            return False
        try:
            conn.getLibVersion()
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def qemu_version(self) -> tuple[int, int, int] | None:
        """The hypervisor (QEMU) version libvirt reports, e.g. (7, 2, 22)."""
        conn = self._connection()
        with self._call("reading hypervisor version"):
            v = int(conn.getVersion())
        return (v // 1_000_000, v // 1000 % 1000, v % 1000) if v > 0 else None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._conn is not None:
            with suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as exc:
            outcome = classify(exc)
            raise HypervisorError(outcome, f"{what}: {_libvirt_error_message(exc)}") from exc

    def _connection(self) -> Any:
        if self._conn is None:
            self.connect()
        return self._conn

    # -- domains -------------------------------------------------------------------

    def list_domains(self) -> list[DomainInfo]:
        """Every domain (running and defined), as DomainInfo; unparseable ones are logged."""
        conn = self._connection()
        with self._call("listing domains"):
            doms = conn.listAllDomains(0)
        out: list[DomainInfo] = []
        for dom in doms:
            try:
                out.append(self._info(dom))
            except HypervisorError as exc:
                # A domain undefined between listing and reading its XML is not an error.
                if exc.outcome is not Outcome.NO_DOMAIN:
                    log.warning("skipping a domain: %s", exc.message)
        return out

    def domain(self, name: str) -> DomainInfo:
        """DomainInfo for one domain by name; HypervisorError(NO_DOMAIN) if unknown."""
        conn = self._connection()
        with self._call(f"looking up domain {name!r}"):
            dom = conn.lookupByName(name)
        return self._info(dom)

    def _info(self, dom: Any) -> DomainInfo:
        with self._call("reading domain XML"):
            active = bool(dom.isActive())
            # Live XML of a running domain carries the agent channel state and aliases.
            xml = dom.XMLDesc(0)
        try:
            parsed = parse_domain_xml(xml)
        except DomainXMLError as exc:
            raise HypervisorError(Outcome.ERROR, str(exc)) from exc
        return DomainInfo(
            name=parsed.name,
            uuid=parsed.uuid,
            running=active,
            disks=parsed.disks,
            agent=parsed.agent,
            machine=parsed.machine,
        )

    def inactive_xml(self, name: str) -> str:
        """The persistent (inactive) definition, as `virsh dumpxml --inactive` prints it."""
        conn = self._connection()
        with self._call(f"reading inactive XML of {name!r}"):
            dom = conn.lookupByName(name)
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))

    def persistent_xml(self, name: str) -> str | None:
        """The persistent definition, or None for a transient domain."""
        conn = self._connection()
        with self._call(f"reading definition of {name!r}"):
            dom = conn.lookupByName(name)
            if not dom.isPersistent():
                return None
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    def define_xml(self, xml: str) -> None:
        """Redefine a domain's persistent configuration (takes effect at next cold boot)."""
        conn = self._connection()
        with self._call("defining domain XML"):
            conn.defineXML(xml)

    def is_active(self, uuid: str) -> bool | None:
        """Whether the domain runs (paused counts); False when it is gone, None if unknown."""
        try:
            dom = self._lookup_uuid(uuid)
            with self._call("reading domain state"):
                return bool(dom.isActive())
        except HypervisorError as exc:
            return False if exc.outcome is Outcome.NO_DOMAIN else None

    def offline_state(self, uuid: str) -> OfflineState:
        """State, managed save and snapshot facts of one domain; raises HypervisorError."""
        dom = self._lookup_uuid(uuid)
        with self._call("reading domain state"):
            state, _reason = dom.state(0)
            return OfflineState(
                active=bool(dom.isActive()),
                state=_STATE_NAMES.get(int(state), f"state {state}"),
                managed_save=bool(dom.hasManagedSaveImage(0)),
                persistent=bool(dom.isPersistent()),
                has_snapshots=int(dom.snapshotNum(0)) > 0,
            )

    def _lookup_uuid(self, uuid: str) -> Any:
        conn = self._connection()
        with self._call(f"looking up domain {uuid}"):
            return conn.lookupByUUIDString(uuid)

    def active_job(self, uuid: str, targets: tuple[str, ...]) -> str | None:
        """Describe a running block job or backup on the domain, or None when idle."""
        dom = self._lookup_uuid(uuid)
        with self._call("reading job info"):
            for target in targets:
                info = dom.blockJobInfo(target, 0)
                if info:
                    kind = _BLOCK_JOB_NAMES.get(int(info.get("type", 0)), "block job")
                    return f"{kind} running on disk {target}"
            stats = dom.jobStats(0)
        op = int(stats.get("operation", 0) or 0)
        if int(stats.get("type", 0) or 0) != libvirt.VIR_DOMAIN_JOB_NONE:
            return f"domain job running ({_JOB_OPERATION_NAMES.get(op, 'operation ' + str(op))})"
        return None

    # -- guest agent ---------------------------------------------------------------

    def agent_command(
        self, uuid: str, command: str, arguments: dict[str, Any] | None, timeout_seconds: float
    ) -> Any:
        """Send one allowed agent command and return its parsed `return` value.

        Raises AgentCommandRefused for anything outside ALLOWED_AGENT_COMMANDS and
        HypervisorError for libvirt or protocol failures.
        """
        if command not in ALLOWED_AGENT_COMMANDS:
            raise AgentCommandRefused(Outcome.ERROR, f"agent command {command!r} is not allowed")
        payload: dict[str, Any] = {"execute": command}
        if arguments:
            payload["arguments"] = arguments
        dom = self._lookup_uuid(uuid)
        # libvirt's default agent timeout blocks forever; always pass ours (whole seconds, >= 1).
        timeout = max(1, round(timeout_seconds))
        started = time.monotonic()
        try:
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(payload), timeout, 0)
        except libvirt.libvirtError as exc:
            outcome = classify(exc)
            elapsed = time.monotonic() - started
            # libvirt reports both "not connected" and "no reply in time" as
            # AGENT_UNRESPONSIVE; the elapsed time tells them apart.
            if outcome is Outcome.AGENT_UNAVAILABLE and elapsed >= timeout - 0.5:
                outcome = Outcome.TIMEOUT
            raise HypervisorError(outcome, f"{command}: {_libvirt_error_message(exc)}") from exc
        return parse_agent_reply(command, reply)

    def ping(self, uuid: str, timeout_seconds: float = 5.0) -> None:
        """guest-ping; raises HypervisorError(AGENT_UNAVAILABLE) when nobody answers."""
        try:
            self.agent_command(uuid, "guest-ping", None, timeout_seconds)
        except HypervisorError as exc:
            if exc.outcome is Outcome.TIMEOUT:
                raise HypervisorError(Outcome.AGENT_UNAVAILABLE, exc.message) from exc
            raise

    def fstrim(
        self, uuid: str, timeout_seconds: float, minimum_bytes: int = 0
    ) -> tuple[FilesystemResult, ...]:
        """Run guest-fstrim and return every filesystem's result.

        We use qemuAgentCommand rather than virDomainFSTrim because the latter
        throws the per-filesystem `paths` array away.
        """
        args = {"minimum": int(minimum_bytes)} if minimum_bytes > 0 else None
        ret = self.agent_command(uuid, "guest-fstrim", args, timeout_seconds)
        return parse_fstrim_return(ret)

    def guest_filesystems(self, uuid: str, timeout_seconds: float = 10.0) -> list[GuestFilesystem]:
        """Filesystems the agent sees, mapped to libvirt disk targets by libvirt itself.

        virDomainGetGuestInfo takes no timeout: it waits as long as the domain's agent
        response timeout, which is "forever" unless someone set one. An agent that
        answers guest-sync but never guest-get-fsinfo would hold the calling trim (its
        concurrency slot, its schedule) or the census for good. So ask guest-get-fsinfo
        ourselves first, with a timeout (a timed-out qemuAgentCommand frees libvirt's
        agent job); then bound the guestInfo call too, for an agent that answers once
        and hangs the second time. Raises HypervisorError (TIMEOUT when out of time).
        """
        self.agent_command(uuid, "guest-get-fsinfo", None, timeout_seconds)
        dom = self._lookup_uuid(uuid)
        info = _call_with_deadline(
            lambda: dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM, 0),
            # libvirt's own guest-sync may take up to 5 s before the command is sent.
            timeout_seconds + 5.0,
            "reading guest filesystems",
        )
        return parse_guest_filesystems(info)


def _call_with_deadline(call: Callable[[], T], timeout_seconds: float, what: str) -> T:
    """Run a blocking libvirt call in a daemon thread and stop waiting after timeout_seconds.

    A call still blocked at the deadline is left behind (libvirt calls cannot be
    cancelled); it ends when libvirt returns. Raises HypervisorError.
    """
    box: list[T] = []
    errors: list[libvirt.libvirtError] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(call())
        except libvirt.libvirtError as exc:
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="libvirt-call", daemon=True).start()
    if not done.wait(timeout_seconds):
        raise HypervisorError(
            Outcome.TIMEOUT, f"{what}: no answer from libvirt within {timeout_seconds:g}s"
        )
    if errors:
        raise HypervisorError(
            classify(errors[0]), f"{what}: {_libvirt_error_message(errors[0])}"
        ) from errors[0]
    if not box:
        raise HypervisorError(Outcome.ERROR, f"{what}: the call failed unexpectedly")
    return box[0]


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
_BLOCK_JOB_NAMES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "block pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "block copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "block commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active block commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}
_JOB_OPERATION_NAMES = {
    libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP: "backup",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "outgoing migration",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE: "save",
    libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP: "dump",
}
