"""The shipped unit file, checked by systemd's own tools: verify and the offline security scan."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "virt-trimd.service"
SCHEMA = ROOT / "daemon" / "virt_trimd" / "config" / "config_schema.json"
INSTALLED_BINARY = "/usr/bin/virt-trimd"
MAX_EXPOSURE = 2.5

# systemd-analyze comes from the package systemd, which .ci/install-deps.sh installs:
# without it these tests fail (FileNotFoundError), never skip.


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # A pipe, not a tty: no colours, no pager.
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["systemd-analyze", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _verify(unit: Path) -> tuple[int, list[str]]:
    """Exit status and the output lines that are about `unit` itself."""
    proc = _run("verify", "--man=no", str(unit))
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in lines if unit.name in line or str(unit) in line]


def _verifiable_copy(tmp_path: Path, text: str) -> Path:
    """The unit as text, runnable by verify on a machine without the installed script.

    verify checks that ExecStart= binaries exist; when virt-trimd is not installed
    (the .deb puts it in /usr/bin) the path is pointed at an executable stub. Nothing
    else of the unit changes.
    """
    if not os.access(INSTALLED_BINARY, os.X_OK):
        stub = tmp_path / "virt-trimd"
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        text = text.replace(INSTALLED_BINARY, str(stub))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_verify_is_clean(tmp_path: Path) -> None:
    unit = _verifiable_copy(tmp_path, UNIT.read_text())
    returncode, about_unit = _verify(unit)
    assert returncode == 0, about_unit
    assert about_unit == []


def test_verify_check_would_catch_a_bad_directive(tmp_path: Path) -> None:
    # systemd-analyze verify exits 0 on unknown keys; only the output tells.
    broken = UNIT.read_text().replace("[Service]\n", "[Service]\nProtectSystm=strict\n", 1)
    unit = _verifiable_copy(tmp_path, broken)
    _, about_unit = _verify(unit)
    assert any("ProtectSystm" in line for line in about_unit)


def test_exposure_score_is_ok() -> None:
    proc = _run("security", "--offline=true", str(UNIT))
    assert proc.returncode == 0, proc.stderr
    match = re.search(
        r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)", proc.stdout + proc.stderr
    )
    assert match is not None, proc.stdout + proc.stderr
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} {match.group(2)}:\n{proc.stdout}"


# -- what the unit promises the daemon -------------------------------------------------


def _service_section() -> list[str]:
    lines = UNIT.read_text().splitlines()
    start = lines.index("[Service]") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("["))
    return lines[start:end]


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in _service_section():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _seconds(span: str) -> float:
    """A systemd or config duration such as 3min, 90s, 2m, 1h30m, in seconds."""
    units = {"h": 3600, "min": 60, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|s)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * units[u] for n, u in parts)


def test_every_service_directive_has_a_comment() -> None:
    lines = _service_section()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_lifecycle_settings() -> None:
    settings = _settings()
    assert settings["Type"] == ["notify"]
    assert settings["WatchdogSec"] == ["60s"]
    reload = settings["ExecReload"]
    assert reload[0].startswith(INSTALLED_BINARY + " check-config")
    # The shell's builtin: /bin/kill is procps, absent from a minimal Debian 13.
    assert reload[1] == """/bin/sh -c 'kill -HUP "$MAINPID"'"""
    # The stop timeout must outlast the daemon's own drain of running trims.
    schema = json.loads(SCHEMA.read_text())
    grace = schema["properties"]["shutdown_grace"]["default"]
    assert _seconds(settings["TimeoutStopSec"][0]) > _seconds(grace)


def test_only_dac_read_search_is_kept() -> None:
    settings = _settings()
    assert settings["CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]
    assert settings["AmbientCapabilities"] == ["CAP_DAC_READ_SEARCH"]
    assert settings["User"] == ["virt-trimd"]
    assert settings["SupplementaryGroups"] == ["libvirt"]
    assert settings["NoNewPrivileges"] == ["yes"]
