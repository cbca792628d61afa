"""README's route for other distributions, run exactly as written, in Debian 12.

The commands are read from README.md's block marked `system-tier: venv-route`, so
the documented route cannot drift from the tested one. PIP_NO_INDEX=1 makes any
download from PyPI fail: the libraries come from the distribution's packages.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from system.conftest import ROOT
from system.debhost import add_libvirt_group, booted, default_port, wait_until

# apt fetches from the mirror inside these tests: a slow mirror is not a hang.
pytestmark = pytest.mark.timeout(900)

UNIT = "virt-trimd.service"


def readme_block(marker: str) -> str:
    """The ```sh block that follows `<!-- system-tier: MARKER -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(
        rf"<!-- system-tier: {re.escape(marker)} -->\s*```sh\n(.*?)```", text, re.DOTALL
    )
    if match is None:
        pytest.fail(f"README.md has no block marked system-tier: {marker}")
    return match.group(1)


def copy_tree(dest: Path) -> None:
    """The checkout's tracked and new files, as a user's clone would have them."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    dest.mkdir(parents=True)
    pack = subprocess.run(
        ["tar", "--null", "--ignore-failed-read", "-T", "-", "-cf", "-"],
        cwd=ROOT,
        input=files,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-xf", "-", "-C", str(dest)], input=pack, check=True)


def test_venv_route_from_readme(rig_boot: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The venv under /opt/virt-trimd plus the unit drop-in runs the service."""
    script = readme_block("venv-route")
    with (
        contextlib.ExitStack() as stack,
        booted("bookworm", tmp_path_factory.mktemp("host-venv")) as host,
    ):
        add_libvirt_group(host)
        copy_tree(host.fs / "root" / "virt-trimd")
        host.run("apt-get", "update", "-qq", timeout_s=300)
        stack.enter_context(default_port())  # the shipped config's 127.0.0.1:9742
        host.run(
            "sh", "-ec", f"cd /root/virt-trimd\nexport PIP_NO_INDEX=1\n{script}", timeout_s=900
        )
        wait_until("the service", lambda: host.unit(UNIT)["SubState"] == "running", 60)
        show = host.run("systemctl", "show", UNIT, "-p", "ExecStart,User").stdout
        assert "path=/opt/virt-trimd/bin/virt-trimd" in show, show
        assert "User=virt-trimd" in show, show
        with urllib.request.urlopen("http://127.0.0.1:9742/metrics", timeout=10) as r:
            assert "virt_trimd_build_info" in r.read().decode()
        pid = host.unit(UNIT)["MainPID"]
        host.run("systemctl", "reload", UNIT)
        assert host.unit(UNIT)["MainPID"] == pid
