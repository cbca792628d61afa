"""The daemon: the main loop, signals, reload, sd_notify and the watchdog."""
