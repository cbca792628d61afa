"""Real configuration files: the shipped example, and permission checks on real inodes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import virt_trimd
from virt_trimd.config.model import (
    ConfigError,
    check_file_permissions,
    example_config_yaml,
    load_config,
    schema_reference_markdown,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "virt-trimd.example.yaml"
DAEMON_DIR = str(Path(virt_trimd.__file__).resolve().parent.parent)


def test_committed_example_is_the_generated_one() -> None:
    assert EXAMPLE.read_text() == example_config_yaml(), (
        "config/virt-trimd.example.yaml is stale; regenerate it with "
        "`PYTHONPATH=daemon python3 -m virt_trimd.config > config/virt-trimd.example.yaml`"
    )


def test_committed_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.source == EXAMPLE
    assert [s.name for s in config.schedules] == ["nightly"]
    assert config.schedules[0].cron == "30 2 * * *"
    assert config.metrics.listen_port == 9742


def test_readme_reference_is_the_generated_one() -> None:
    readme = (REPO / "config" / "README.md").read_text()
    assert schema_reference_markdown() in readme, (
        "config/README.md has a stale option table; regenerate it with "
        "`PYTHONPATH=daemon python3 -m virt_trimd.config --markdown`"
    )


def test_module_entry_point_prints_the_example_and_the_reference() -> None:
    env = {**os.environ, "PYTHONPATH": DAEMON_DIR}
    run = [sys.executable, "-m", "virt_trimd.config"]
    example = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert example.stdout == example_config_yaml()
    markdown = subprocess.run(
        [*run, "--markdown"], env=env, capture_output=True, text=True, check=True
    )
    assert markdown.stdout.startswith("| Key | Type | Default | Description |")


def _private_config(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    path = directory / "config.yaml"
    path.write_text("census_interval: 1m\n")
    path.chmod(0o600)
    return path


def test_private_file_passes(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = _private_config(tmp_path)
    assert check_file_permissions(path) == []
    assert load_config(path).census_interval_seconds == 60.0


@pytest.mark.parametrize(("mode", "who"), [(0o620, "group"), (0o602, "other users")])
def test_file_writable_by_others_is_reported(tmp_path: Path, mode: int, who: str) -> None:
    tmp_path.chmod(0o755)
    path = _private_config(tmp_path)
    path.chmod(mode)
    problems = check_file_permissions(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: the configuration file is writable by {who}")
    assert f"chmod go-w {path}" in problems[0]


def test_world_writable_directory_is_reported(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = _private_config(tmp_path)
    path.parent.chmod(0o777)
    problems = check_file_permissions(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path.parent}: the directory is writable by group and other")


def test_sticky_directory_is_accepted(tmp_path: Path) -> None:
    # Like /tmp: others may create files there but cannot replace ours.
    tmp_path.chmod(0o755)
    path = _private_config(tmp_path)
    path.parent.chmod(0o1777)
    assert check_file_permissions(path) == []


def test_symlink_target_is_checked(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    target = _private_config(tmp_path)
    target.chmod(0o666)
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    problems = check_file_permissions(link)
    assert any("writable by group and other users" in p for p in problems)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")
def test_file_owned_by_another_user_is_reported(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = _private_config(tmp_path)
    os.chown(path, 65534, 65534)
    problems = check_file_permissions(path)
    assert len(problems) == 1
    assert "owned by uid 65534" in problems[0]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    problems = check_file_permissions(tmp_path / "absent.yaml")
    assert problems == [
        f"{tmp_path / 'absent.yaml'}: cannot check the permissions: No such file or directory"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = _private_config(tmp_path)
    path.chmod(0o000)
    with pytest.raises(ConfigError, match="cannot read the configuration file: Permission"):
        load_config(path)


def test_real_file_round_trip_with_errors_on_known_lines(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "# comment\n"
        "metrics:\n"
        "  listen: '[::1]:70000'\n"
        "schedules:\n"
        "  - name: a\n"
        "    cron: '0 3 * * 8'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [e.split(": ", 2)[:2] for e in info.value.errors] == [
        [f"{path}:3", "metrics.listen"],
        [f"{path}:6", "schedules[0].cron"],
    ]
