"""A scriptable guest agent for fault tests: swap the rig guest's qemu-ga for a shell script.

The rig's init runs `qemu-ga` from PATH in a respawn loop. `install_fake_agent` uses the
real agent one last time (guest-exec) to write a busybox-sh agent over /bin/qemu-ga and to
kill the real one; init then starts the fake on the same virtio port. The fake answers
libvirt's guest-sync (so libvirt believes the agent is healthy) and guest-ping, and for
guest-fstrim and guest-get-fsinfo does what the test asked: answer with a given line,
answer late, or never answer. Everything it receives is echoed to the serial console
(`FAKE-AGENT-RX <line>`), so a test can read on the host exactly which commands reached
the guest. On `guest-fake-restore` (see `restore_real_agent`), or after `duration_s` at the latest,
it puts the real qemu-ga back and exits; init restarts it.

This is fault injection inside the guest, where a hostile or broken guest really lives:
libvirt and the daemon under test are untouched.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from dataclasses import dataclass

import libvirt

import rig

RX_MARKER = "FAKE-AGENT-RX "
UP_MARKER = "FAKE-AGENT-UP"
DOWN_MARKER = "FAKE-AGENT-DOWN"

# Runs as `qemu-ga -m virtio-serial -p PORT -t /run -f PIDFILE` from the rig's init loop.
# `read -t 1` lets it notice its deadline while libvirt is silent. Replies are one line
# each, as qemu-ga writes them; guest-sync echoes the id libvirt sent.
_FAKE_AGENT = r"""#!/bin/sh
port=""
while [ $# -gt 0 ]; do [ "$1" = -p ] && port=$2; shift; done
cfg=/run/fake-agent
end=$(( $(date +%s) + $(cat $cfg/duration) ))
exec 3<>"$port"
echo "FAKE-AGENT-UP" > /dev/console
reply() {
    # $1: name of the reply file; absent means never answer.
    [ -f "$cfg/$1.delay" ] && sleep "$(cat "$cfg/$1.delay")"
    [ -f "$cfg/$1" ] && cat "$cfg/$1" >&3
}
while [ "$(date +%s)" -lt "$end" ]; do
    IFS= read -r -t 1 line <&3 || continue
    echo "FAKE-AGENT-RX $line" > /dev/console
    case "$line" in
        *guest-sync-delimited*)
            id=$(echo "$line" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
            printf '\377{"return": %s}\n' "$id" >&3 ;;
        *guest-sync*)
            id=$(echo "$line" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
            printf '{"return": %s}\n' "$id" >&3 ;;
        *guest-ping*) printf '{"return": {}}\n' >&3 ;;
        *guest-fstrim*) reply fstrim ;;
        *guest-get-fsinfo*) reply fsinfo ;;
        *guest-info*) reply info ;;
        *guest-fake-restore*) printf '{"return": {}}\n' >&3; break ;;
        *) printf '{"error": {"class": "CommandNotFound", "desc": "fake agent"}}\n' >&3 ;;
    esac
done
# A new inode: this shell is still reading the old file.
cp /run/qemu-ga.real /bin/qemu-ga.new && mv /bin/qemu-ga.new /bin/qemu-ga
echo "FAKE-AGENT-DOWN" > /dev/console
"""


@dataclass(frozen=True)
class FakeReplies:
    """What the fake agent answers; None for a command means it never answers it.

    `*_delay_s` makes it sleep before answering (the guest can be frozen meanwhile).
    Replies are single JSON lines as the agent protocol wants them.
    """

    fstrim: str | None = None
    fstrim_delay_s: float | None = None
    fsinfo: str | None = '{"return": []}'
    # When set, guest-fstrim is answered with a valid reply of about this many bytes
    # (one very long mountpoint), built inside the guest: too big for a command line.
    fstrim_padding_bytes: int | None = None
    info: str | None = '{"return": {"version": "fake", "supported_commands": []}}'


def console_text(handle: rig.GuestHandle) -> str:
    """The guest's serial console so far."""
    return handle.console_log.read_text(errors="replace")


def received_commands(handle: rig.GuestHandle, since: int = 0) -> list[str]:
    """`execute` names the fake agent received, from console offset `since` on."""
    names: list[str] = []
    for line in console_text(handle)[since:].splitlines():
        if RX_MARKER in line:
            m = re.search(r'"execute"\s*:\s*"([^"]+)"', line)
            names.append(m.group(1) if m else "?")
    return names


def _wait_console(handle: rig.GuestHandle, marker: str, after: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = console_text(handle)
        pos = text.find(marker, after)
        if pos >= 0:
            return pos
        time.sleep(0.2)
    raise rig.RigError(f"{handle.name}: no {marker} on the console within {timeout_s}s")


def install_fake_agent(
    handle: rig.GuestHandle, replies: FakeReplies, duration_s: float, timeout_s: float = 30
) -> int:
    """Replace qemu-ga in a running rig guest by the fake for `duration_s` seconds.

    Needs the real agent answering (it is used for the swap). Returns the console offset
    at which the fake came up, for `received_commands`. The caller should later call
    `restore_real_agent` if it wants the guest's real agent again.
    """
    dom = handle.dom
    start = len(console_text(handle))
    files = {
        "duration": str(int(duration_s)),
        "fstrim": replies.fstrim,
        "fstrim.delay": None if replies.fstrim_delay_s is None else str(replies.fstrim_delay_s),
        "fsinfo": replies.fsinfo,
        "info": replies.info,
    }
    lines = ["set -e", "rm -rf /run/fake-agent", "mkdir -p /run/fake-agent"]
    for name, content in files.items():
        if content is not None:
            body = content if name in ("duration", "fstrim.delay") else content + "\n"
            lines.append(f"printf '%s' {shlex.quote(body)} > /run/fake-agent/{name}")
    if replies.fstrim_padding_bytes is not None:
        lines += [
            """printf '{"return": {"paths": [{"path": "/' > /run/fake-agent/fstrim""",
            f"yes x | tr -d '\\n' | head -c {int(replies.fstrim_padding_bytes)}"
            " >> /run/fake-agent/fstrim",
            """printf '", "trimmed": 1}]}}\\n' >> /run/fake-agent/fstrim""",
        ]
    lines += [
        "[ -f /run/qemu-ga.real ] || cp /bin/qemu-ga /run/qemu-ga.real",
        f"printf '%s' {shlex.quote(_FAKE_AGENT)} > /bin/qemu-ga.new",
        "chmod 755 /bin/qemu-ga.new",
        "mv /bin/qemu-ga.new /bin/qemu-ga",
        # Kill the real agent only after guest-exec has answered us.
        "(sleep 0.5; kill $(pidof qemu-ga)) </dev/null >/dev/null 2>&1 &",
    ]
    rig.guest_exec(dom, ["/bin/sh", "-c", "\n".join(lines)])
    up = _wait_console(handle, UP_MARKER, start, timeout_s)
    # libvirt learns that the port was reopened from a QEMU event; until then it calls
    # the agent disconnected. The fake answers guest-ping, so wait for that.
    rig.wait_for_agent(dom, timeout_s)
    return up


def restore_real_agent(handle: rig.GuestHandle, since: int, timeout_s: float = 60) -> None:
    """Tell the fake (started at console offset `since`) to hand back; wait for qemu-ga.

    `guest-fake-restore` is a command only the fake knows; the rig sends it directly.
    If the fake already ended (its duration ran out) this just waits for the real agent.
    """
    if DOWN_MARKER not in console_text(handle)[since:]:
        # A frozen or busy fake may not answer: its duration ends it then.
        with contextlib.suppress(libvirt.libvirtError):
            rig.agent_command(handle.dom, "guest-fake-restore", timeout_s=10)
    _wait_console(handle, DOWN_MARKER, since, timeout_s)
    rig.wait_for_agent(handle.dom, timeout_s)


def domain_state(dom: libvirt.virDomain) -> int:
    """libvirt's VIR_DOMAIN_* state of dom."""
    return int(dom.state()[0])
