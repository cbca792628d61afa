"""System tier: the real .deb in booted Debian 12 and 13 containers (systemd as PID 1).

Needs root, mmdebstrap, systemd-nspawn and the rig's libvirtd (`.ci/install-deps.sh`
installs and starts them); a missing piece fails the tests, it does not skip them.
Guests are rig guests (`vtrimd-test-*`) whose images live under
/var/lib/libvirt/images, where real ones do: the unit's PrivateTmp hides /tmp.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

import rig

ROOT = Path(__file__).resolve().parents[2]
# The figure README claims for the live `systemd-analyze security` of the packaged unit.
README_SECURITY = float(
    re.search(
        r"live in the Debian 12 and 13 containers: \*\*(\d+\.\d+)", (ROOT / "README.md").read_text()
    ).group(1)  # type: ignore[union-attr]
)
IMAGES = Path("/var/lib/libvirt/images")
SUITES = ("bookworm", "trixie")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected from this directory as system."""
    here = Path(__file__).resolve().parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.system)


@dataclass(frozen=True)
class Debs:
    """The package built from this tree (version N) and a bumped rebuild (N+1)."""

    current: Path
    version: str
    upgrade: Path
    upgrade_version: str


def _build_deb(out: Path, version: str | None = None) -> Path:
    env = dict(os.environ, DEB_OUT=str(out))
    if version:
        env["DEB_VERSION"] = version
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "build-deb.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"make deb failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    debs = sorted(out.glob("virt-trimd_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    """`make deb` of this tree, and the same tree rebuilt as version N+1."""
    changelog = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    version = changelog.split("(", 1)[1].split(")", 1)[0]
    upgrade_version = f"{version}.1"
    current = _build_deb(tmp_path_factory.mktemp("deb-n"))
    upgrade = _build_deb(tmp_path_factory.mktemp("deb-n1"), upgrade_version)
    return Debs(current, version, upgrade, upgrade_version)


@pytest.fixture(scope="session")
def rig_boot() -> rig.BootFiles:
    """The rig's libvirtd (group libvirt on the read-write socket) and guest boot files."""
    if os.geteuid() != 0:
        pytest.fail("the system tier needs root (mount, systemd-nspawn, nsenter)")
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run .ci/install-deps.sh")
    rig.quiet_libvirt_errors()
    rig.ensure_libvirtd()
    sock = os.stat("/run/libvirt/libvirt-sock")
    group = grp.getgrgid(sock.st_gid).gr_name
    if group != "libvirt" or stat.S_IMODE(sock.st_mode) != 0o770:
        pytest.fail(
            f"/run/libvirt/libvirt-sock is {group}:{stat.S_IMODE(sock.st_mode):o}, not "
            "libvirt:770: restart libvirtd with tests/rig/libvirtd.conf (.ci/install-deps.sh)"
        )
    return rig.build_boot_files(rig.default_cache_dir())


@pytest.fixture(scope="session")
def libvirt_conn(rig_boot: rig.BootFiles) -> Iterator[libvirt.virConnect]:
    """A root connection to the host's libvirtd, for the test's own guests."""
    conn = libvirt.open(rig.LIBVIRT_URI)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def image_root() -> Iterator[Path]:
    """This session's directory under /var/lib/libvirt/images, bind-mounted into hosts."""
    path = IMAGES / f"vtrimd-test-system-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)
