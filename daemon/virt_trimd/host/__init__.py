"""The outside world: libvirt and the guest agent, domain XML, qemu-img and stat of images."""
