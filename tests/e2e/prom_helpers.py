"""A real Prometheus server for end-to-end tests: Debian's /usr/bin/prometheus on loopback.

Started per test with a generated config, a temporary TSDB and a free port; never the
system service. `stop()` always ends it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from e2e.daemon_proc import wait_for
from support.files import free_port

PROMETHEUS = "/usr/bin/prometheus"


class PrometheusProc:
    """`prometheus` scraping `targets` under `job` every second, optionally with rule files."""

    def __init__(
        self,
        workdir: Path,
        job: str,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
    ) -> None:
        binary = shutil.which("prometheus") or PROMETHEUS
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _get(self, path: str, **params: str) -> Any:
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read().decode())

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /-/ready answers 200; AssertionError with the log if it exits first."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for(ready, timeout, "prometheus /-/ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; the result vector."""
        doc = self._get("/api/v1/query", query=expr)
        assert doc["status"] == "success", doc
        assert doc["data"]["resultType"] == "vector", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        """Every rule of every loaded group, as /api/v1/rules reports it."""
        doc = self._get("/api/v1/rules")
        assert doc["status"] == "success", doc
        return [r for g in doc["data"]["groups"] for r in g["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts."""
        doc = self._get("/api/v1/alerts")
        assert doc["status"] == "success", doc
        alerts: list[dict[str, Any]] = doc["data"]["alerts"]
        return alerts

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL after `timeout`; idempotent; closes the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return code
