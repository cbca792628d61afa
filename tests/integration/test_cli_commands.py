"""README promises of the CLI that need no guest, run as an operator runs them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import virt_trimd
from support.cli import virt_trimd as run_cli
from support.files import write_config, write_web_config
from support.records import iso, trim_record
from virt_trimd.config.model import load_config
from virt_trimd.engine.history import History
from virt_trimd.records import Result
from virt_trimd.service.daemon import Daemon


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"virt-trimd {virt_trimd.__version__}\n"


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    """ExecReload= runs check-config before SIGHUP: exit 0 lets the reload go ahead."""
    cfg = write_config(
        tmp_path / "config.yaml",
        "schedules:\n  - name: nightly\n    cron: '30 2 * * *'\n  - name: often\n    every: 6h\n",
    )
    proc = run_cli("check-config", "--config", str(cfg))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{cfg}: OK, 2 schedule(s)\n", "")


def test_check_config_reports_every_error_and_exits_2(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "config.yaml",
        "census_interval: soon\nschedules:\n  - name: bad name\n    every: 1h\n    bogus: 1\n",
    )
    proc = run_cli("check-config", "--config", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{cfg}:1", f"{cfg}:3", f"{cfg}:5"]
    assert proc.stdout == ""


def test_check_config_checks_the_web_config_too(tmp_path: Path) -> None:
    web = write_web_config(tmp_path, "basic_auth_users:\n  ops: not-a-hash\n")
    cfg = write_config(tmp_path / "config.yaml", f"metrics:\n  web_config_file: {web}\n")
    proc = run_cli("check-config", "--config", str(cfg))
    assert proc.returncode == 2
    assert f"{web}:2: basic_auth_users.ops: expected a bcrypt hash" in proc.stderr
    assert "not-a-hash" not in proc.stderr


def test_history_limit_keeps_the_newest_rows(tmp_path: Path) -> None:
    t0 = time.time() - 3600
    with History(tmp_path) as hist:
        for i in range(5):
            hist.append(trim_record(f"dom{i}", started_at=iso(t0 + i)))
    proc = run_cli("history", "--state-dir", str(tmp_path), "--limit", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["domain"] for r in json.loads(proc.stdout)["trims"]] == ["dom3", "dom4"]
    table = run_cli("history", "--state-dir", str(tmp_path), "--limit", "3")
    assert [line.split()[1] for line in table.stdout.splitlines()[1:]] == ["dom2", "dom3", "dom4"]


def test_the_daily_prune_job_prunes(tmp_path: Path) -> None:
    """Pruning runs at start and then daily: the scheduler holds a one-day job doing it."""
    cfg = write_config(
        tmp_path / "config.yaml",
        f"state_dir: {tmp_path / 'state'}\nhistory_retention: 30d\ncensus_interval: 0\n"
        "libvirt:\n  uri: test:///default\n",
    )
    daemon = Daemon(load_config(cfg), cfg, hostname="host")
    daemon.open_history()
    assert daemon.history is not None
    now = time.time()
    daemon.start_scheduler()
    scheduler = daemon.scheduler
    assert scheduler is not None
    try:
        job = scheduler.get_job("history-prune")
        assert job.trigger.interval.total_seconds() == 86400
        # A day later: one row has aged past the retention since the start-up prune.
        daemon.history.append(trim_record("old", Result.ERROR, started_at=iso(now - 31 * 86400)))
        daemon.history.append(trim_record("new", Result.ERROR, started_at=iso(now - 86400)))
        job.func()
        assert [r.domain for r in daemon.history.query()] == ["new"]
    finally:
        scheduler.shutdown(wait=False)
        daemon.history.close()
