"""Real hypervisor test rig: libvirtd + QEMU (TCG) guests running the real qemu-ga.

See tests/rig/README.md. Everything the rig creates is named with TEST_PREFIX, and
cleanup only ever touches such domains.
"""

from rig.guests import (
    AgentMode,
    Bus,
    Discard,
    DiskSpec,
    GuestFactory,
    GuestHandle,
    GuestSpec,
    Owner,
    agent_command,
    boot_failure,
    cleanup_test_domains,
    destroy_guest,
    domain_xml,
    guest_exec,
    guest_owner,
    start_guest,
    start_guests,
    wait_for_agent,
    wait_for_boot,
    wait_ready,
)
from rig.host import (
    LIBVIRT_URI,
    TEST_PREFIX,
    RigError,
    default_cache_dir,
    ensure_libvirtd,
    ensure_virtlogd,
    quiet_libvirt_errors,
    require_tools,
    session_prefix,
)
from rig.images import ImageFormat, allocated_bytes, make_disk_image
from rig.initramfs import BootFiles, build_boot_files, guest_kernel_version

__all__ = [
    "LIBVIRT_URI",
    "TEST_PREFIX",
    "AgentMode",
    "BootFiles",
    "Bus",
    "Discard",
    "DiskSpec",
    "GuestFactory",
    "GuestHandle",
    "GuestSpec",
    "ImageFormat",
    "Owner",
    "RigError",
    "agent_command",
    "allocated_bytes",
    "boot_failure",
    "build_boot_files",
    "cleanup_test_domains",
    "default_cache_dir",
    "destroy_guest",
    "domain_xml",
    "ensure_libvirtd",
    "ensure_virtlogd",
    "guest_exec",
    "guest_kernel_version",
    "guest_owner",
    "make_disk_image",
    "quiet_libvirt_errors",
    "require_tools",
    "session_prefix",
    "start_guest",
    "start_guests",
    "wait_for_agent",
    "wait_for_boot",
    "wait_ready",
]
