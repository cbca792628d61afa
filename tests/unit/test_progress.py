"""The progress line: on a terminal only, escaped, erased before the result."""

from __future__ import annotations

import io
import os
import pty
import select

from virt_trimd.cli.progress import Progress

ERASE = "\r\x1b[K"


def _read_line_output(master: int) -> str:
    """What the pty received, up to the final erase: a pty hands over writes in pieces."""
    text = ""
    while not text.endswith(ERASE):
        ready, _, _ = select.select([master], [], [], 5)
        if not ready:
            break  # the assertions below say what is missing
        text += os.read(master, 65536).decode()
    return text


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
        text = _read_line_output(master)
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


def test_trim_and_sparsify_sweeps_drive_the_line() -> None:
    # trim --all and sparsify share _sweep_with_progress; a fake reclaimer stands in.
    from typing import Any

    from virt_trimd.cli.commands import _sweep_with_progress
    from virt_trimd.engine.sweep import SweepPlan
    from virt_trimd.engine.trim import TrimOptions
    from virt_trimd.records import AgentChannel, DomainInfo, Result, TrimRecord

    class Reclaim:
        def trim(self, dom: DomainInfo, opts: TrimOptions) -> TrimRecord:
            return TrimRecord(dom.name, dom.uuid, Result.SUCCESS, "", "2026-01-01T00:00:00Z", 0.0)

    doms = [DomainInfo(n, f"u-{n}", False, (), AgentChannel(False, None)) for n in ("db1", "web1")]
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            reclaimer: Any = Reclaim()
            summary = _sweep_with_progress(
                reclaimer, doms, TrimOptions(), SweepPlan(), Progress(len(doms), tty)
            )
        text = _read_line_output(master)
    finally:
        os.close(master)
        os.close(slave)
    assert [r.domain for r in summary.records] == ["db1", "web1"]
    assert "[0/2] db1" in text and "[2/2] -" in text and text.endswith("\r\x1b[K")
