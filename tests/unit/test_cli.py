"""The CLI's own logic: log level choice and the single error-to-exit-code mapping."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from virt_trimd.cli.commands import EXIT_FAILED, EXIT_USAGE, main


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _level_after(argv: list[str]) -> str:
    main(argv, out=io.StringIO())
    return logging.getLevelName(logging.getLogger().level)


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["--log-level=WARNING", "run"], "WARNING"),  # was INFO: argv held no '--log-level'
        (["--log-level", "ERROR", "run"], "ERROR"),
        (["--log-level=DEBUG", "trim", "--all"], "DEBUG"),
        (["run"], "INFO"),
        (["trim", "--all"], "WARNING"),
    ],
)
def test_log_level_comes_from_the_parsed_option(
    argv: list[str], level: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A config that does not exist: the command fails at once, after logging is set up.
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert _level_after([*argv, "--config", missing]) == level


def test_command_errors_become_exit_1_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A HistoryError raised by a command is printed once by main, exit status 1."""
    status = main(["history", "--state-dir", str(tmp_path / "no-such-dir")], out=io.StringIO())
    err = capsys.readouterr().err
    assert status == EXIT_FAILED
    assert err.startswith("virt-trimd: ") and err.count("virt-trimd: ") == 1


def test_configuration_errors_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("census_interval: forever\n")
    assert main(["check-config", "--config", str(bad)], out=io.StringIO()) == EXIT_USAGE
    assert f"{bad}:1: census_interval:" in capsys.readouterr().err
