"""Ansible connection to a booted systemd-nspawn container through its namespaces.

The system tier's containers (tests/system/debhost.py) share the host's network and
have no sshd; the controller is root on the same machine. So this connection runs
every command as `nsenter -t <init pid> -a` (all of the container's namespaces, as
DebianHost.run does) and moves files through the same door, as `cat` with stdin or
stdout, so tmpfs mounts inside the container (/tmp, /run) are no obstacle. Set
``ansible_host`` to the PID of the container's init (DebianHost.leader).

Loaded by Debian's ansible-core from ANSIBLE_CONNECTION_PLUGINS; it is test
machinery, not part of the role, which works over any connection (ssh on real hosts).
"""

from __future__ import annotations

import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleFileNotFound
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nsenter
short_description: run commands inside a systemd-nspawn container with nsenter
description:
  - Runs commands in all namespaces of the process given as ansible_host (the
    container's init) and copies files through cat on stdin and stdout.
author: virt-trimd tests
options:
  remote_addr:
    description: PID of the container's init process.
    vars:
      - name: inventory_hostname
      - name: ansible_host
"""

# The container's own environment, not the controller's (DebianHost.INNER_ENV), with
# HOME: Ansible's remote temporary directory is ~/.ansible/tmp.
INNER_ENV = (
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
    "HOME=/root",
)


class Connection(ConnectionBase):  # type: ignore[misc]  # ansible-core ships no types
    """One container, addressed by its init's PID."""

    transport = "nsenter"
    has_pipelining = True

    def _prefix(self) -> list[str]:
        pid = str(self.get_option("remote_addr"))
        if not pid.isdigit():
            raise AnsibleConnectionFailure(f"ansible_host must be a PID, got {pid!r}")
        return ["nsenter", "-t", pid, "-a", "env", "-i", *INNER_ENV]

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        """Run cmd with /bin/sh -c inside; stdin is in_data (pipelined modules)."""
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = subprocess.run(
            [*self._prefix(), "/bin/sh", "-c", cmd],
            input=in_data or b"",
            capture_output=True,
            check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        """Copy a controller file into the container (as root, through cat)."""
        super().put_file(in_path, out_path)
        try:
            with open(in_path, "rb") as src:
                proc = subprocess.run(
                    [*self._prefix(), "/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"],
                    stdin=src,
                    capture_output=True,
                    check=False,
                )
        except FileNotFoundError as exc:
            raise AnsibleFileNotFound(f"{in_path}: {exc}") from exc
        if proc.returncode != 0:
            raise AnsibleConnectionFailure(f"put {out_path}: {proc.stderr.decode()[-500:]}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        """Copy a file out of the container."""
        super().fetch_file(in_path, out_path)
        proc = subprocess.run([*self._prefix(), "cat", in_path], capture_output=True, check=False)
        if proc.returncode != 0:
            raise AnsibleFileNotFound(f"fetch {in_path}: {proc.stderr.decode()[-500:]}")
        with open(out_path, "wb") as dest:
            dest.write(proc.stdout)

    def close(self) -> None:
        """Nothing stays open between commands."""
        self._connected = False
