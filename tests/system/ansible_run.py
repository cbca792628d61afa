"""Running the role in deploy/ansible against booted containers, with Debian's ansible-core.

The inventory names each container by its machine name and reaches it through the
nsenter connection plugin (tests/system/ansible/connection_plugins), with
``ansible_host`` set to the PID of its init. Nothing is fetched from Galaxy: the role
uses ansible.builtin only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from system.debhost import DebianHost

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
PLUGINS = Path(__file__).resolve().parent / "ansible" / "connection_plugins"
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*(?P<counts>(?:\w+=\d+\s*)+)$", re.M)


class AnsibleMissing(Exception):
    """ansible-playbook is not installed (.ci/install-deps.sh installs ansible-core)."""


@dataclass(frozen=True)
class PlayResult:
    """One ansible-playbook run: exit status, its output, and PLAY RECAP per host."""

    returncode: int
    output: str
    recap: dict[str, dict[str, int]]

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]


def write_inventory(
    path: Path,
    hosts: Sequence[DebianHost],
    group_vars: Mapping[str, Any],
    host_vars: Mapping[str, Mapping[str, Any]],
    storage_group: str = "shared_storage",
) -> None:
    """An inventory: every host in group virt_trimd_hosts and in ``storage_group``."""
    inventory = {
        "all": {
            "children": {
                "virt_trimd_hosts": {
                    "children": {
                        storage_group: {
                            "hosts": {
                                h.name: {
                                    "ansible_host": str(h.leader),
                                    "ansible_connection": "nsenter",
                                    "ansible_python_interpreter": "/usr/bin/python3",
                                    **host_vars.get(h.name, {}),
                                }
                                for h in hosts
                            }
                        }
                    },
                    "vars": dict(group_vars),
                }
            }
        }
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))


def run_playbook(inventory: Path, workdir: Path, timeout_s: float = 1200) -> PlayResult:
    """ansible-playbook deploy/ansible/site.yml against ``inventory``."""
    binary = shutil.which("ansible-playbook")
    if binary is None:
        raise AnsibleMissing("ansible-playbook is missing: run .ci/install-deps.sh")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-local"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_GALAXY_SERVER_LIST": "",
    }
    if "ANSIBLE_DEBUG" in os.environ:
        env["ANSIBLE_DEBUG"] = os.environ["ANSIBLE_DEBUG"]
    proc = subprocess.run(
        [binary, "-i", str(inventory), str(ANSIBLE_DIR / "site.yml")],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = proc.stdout + proc.stderr
    recap_text = output.rsplit("PLAY RECAP", 1)[-1] if "PLAY RECAP" in output else ""
    recap = {
        m["host"]: {k: int(v) for k, v in (kv.split("=") for kv in m["counts"].split())}
        for m in RECAP.finditer(recap_text)
    }
    return PlayResult(proc.returncode, output, recap)
