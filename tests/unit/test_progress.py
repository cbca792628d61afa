"""The progress line: on a terminal only, escaped, erased before the result."""

from __future__ import annotations

import io
import os
import pty

from virt_trimd.cli.progress import Progress


def test_terminal_gets_a_line_rewritten_in_place_and_erased() -> None:
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            progress = Progress(2, tty)
            assert progress.enabled
            progress.start("web01")
            progress.start("evil\x1b[2J")
            progress.done("web01")
            progress.done("evil\x1b[2J")
            progress.finish()
        text = os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "[0/2] web01" in text and "[1/2] evil" in text and "[2/2] -" in text
    assert "\x1b[2J" not in text  # the guest-chosen escape is shown, not obeyed
    assert text.endswith("\r\x1b[K")  # erased: the table that follows starts clean
    assert "\n" not in text


def test_no_terminal_or_json_gets_nothing() -> None:
    out = io.StringIO()
    progress = Progress(1, out)
    progress.start("web01")
    progress.done("web01")
    progress.finish()
    assert not progress.enabled and out.getvalue() == ""
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            quiet = Progress(1, tty, enabled=False)  # --json on a terminal
            quiet.start("web01")
            quiet.finish()
        os.write(slave, b"end")
        assert os.read(master, 100) == b"end"
    finally:
        os.close(master)
        os.close(slave)
