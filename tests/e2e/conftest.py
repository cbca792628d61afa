"""End-to-end fixtures: a real libvirtd, rig boot files and throwaway TCG guests.

Every test under tests/e2e is marked `e2e`. If libvirtd cannot be started the tests
fail; set VTRIMD_SKIP_E2E=1 to skip them on purpose. VTRIMD_RIG_KEEP=1 leaves a test's
guests running for debugging (clean up with `PYTHONPATH=tests python3 -m rig down`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# A missing libvirt-python must fail the e2e tests with advice (in rig_boot), not turn
# into a collection error in every module or a silent skip.
try:
    import libvirt

    import rig

    _IMPORT_ERROR: str | None = None
except ImportError as _exc:
    _IMPORT_ERROR = str(_exc)

_HERE = Path(__file__).resolve().parent

# Guests of this run are named vtrimd-test-<pid>-NAME (see rig.session_prefix): another
# run on the same libvirtd, someone else's or a benchmark, then never holds our names.
os.environ.setdefault("VTRIMD_RIG_SESSION", f"{os.getpid()}-")

if _IMPORT_ERROR is not None and os.environ.get("VTRIMD_SKIP_E2E") == "1":
    # Skipping was asked for explicitly: do not let e2e modules fail on their imports.
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected from this directory as e2e."""
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.e2e)


def _skip_requested() -> bool:
    return os.environ.get("VTRIMD_SKIP_E2E") == "1"


@pytest.fixture(scope="session")
def rig_boot() -> rig.BootFiles:
    """libvirtd answering on qemu:///system, and the cached guest kernel + initramfs."""
    if _skip_requested():
        pytest.skip("VTRIMD_SKIP_E2E=1")
    if _IMPORT_ERROR is not None:
        pytest.fail(f"cannot import the rig ({_IMPORT_ERROR}); run .ci/install-deps.sh")
    rig.quiet_libvirt_errors()
    try:
        rig.ensure_libvirtd()
        return rig.build_boot_files(rig.default_cache_dir())
    except rig.RigError as exc:
        pytest.fail(f"e2e rig unavailable (set VTRIMD_SKIP_E2E=1 to skip): {exc}", pytrace=False)


@pytest.fixture(scope="session")
def libvirt_conn(rig_boot: rig.BootFiles) -> Iterator[libvirt.virConnect]:
    """A qemu:///system connection; stale rig domains are removed at start and end."""
    conn = libvirt.open(rig.LIBVIRT_URI)
    rig.cleanup_test_domains(conn)
    yield conn
    if os.environ.get("VTRIMD_RIG_KEEP") != "1":
        rig.cleanup_test_domains(conn)
    conn.close()


@pytest.fixture
def guest_factory(
    libvirt_conn: libvirt.virConnect, rig_boot: rig.BootFiles, tmp_path: Path
) -> Iterator[rig.GuestFactory]:
    """Call with GuestSpecs (and optional timeout_s) to start guests and wait until ready.

    Returns their GuestHandles; every guest is destroyed at teardown, even if it never
    came up.
    """
    names: list[str] = []

    def start(*specs: rig.GuestSpec, timeout_s: float = 120) -> list[rig.GuestHandle]:
        names.extend(s.domain_name for s in specs)
        return rig.start_guests(
            libvirt_conn, specs, tmp_path / "guests", rig_boot, timeout_s=timeout_s
        )

    yield start
    if os.environ.get("VTRIMD_RIG_KEEP") == "1":
        return
    for name in names:
        rig.destroy_guest(libvirt_conn, name)
