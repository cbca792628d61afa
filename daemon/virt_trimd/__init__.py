"""virt-trimd: scheduled guest fstrim for libvirt hosts, measured on the host."""

__version__ = "0.1.0"
