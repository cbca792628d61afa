"""The daemon: the main loop, signals, reload, sd_notify and the watchdog."""


class StartupError(Exception):
    """The daemon cannot start (bad config, port taken); exit non-zero so systemd restarts.

    Defined here, not in `daemon`, so the CLI can catch it without importing the loop
    (and libvirt with it) for commands that never start a daemon.
    """
