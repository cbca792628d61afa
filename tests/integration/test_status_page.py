"""The daemon's status page and /api/v1/status over real HTTP(S), from a real history file."""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.error import HTTPError

import bcrypt
import pytest

from support.files import write_web_config
from support.status import populate_history
from virt_trimd.config.model import Config, MetricsConfig
from virt_trimd.service.daemon import Daemon

PASSWORD = "status page password"
PASSWORD_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def make_daemon(tmp_path: Path, web_config: Path | None = None) -> Daemon:
    state = tmp_path / "state"
    populate_history(state, time.time())
    config = dataclasses.replace(
        Config.default(),
        state_dir=state,
        metrics=MetricsConfig("127.0.0.1", 0, web_config),
    )
    daemon = Daemon(config, None, hostname="testhost")
    daemon.open_history()
    daemon.start_metrics()
    return daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = make_daemon(tmp_path)
    yield d
    assert d.server is not None and d.history is not None
    d.server.shutdown()
    d.history.close()


def get(
    url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return response.status, dict(response.headers), response.read()


class StrictParser(HTMLParser):
    """Collects text per element id and fails on unbalanced tags."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.texts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def test_page_is_well_formed_escaped_sorted_and_self_contained(daemon: Daemon) -> None:
    assert daemon.server is not None
    status, headers, body = get(daemon.server.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    text = body.decode()
    # Well-formed as XML (every tag closed, every attribute quoted, every & escaped).
    root = ET.fromstring(text.split("\n", 1)[1])
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    # The hostile name is text, never a tag; nothing runs and nothing is fetched.
    assert "script" not in parser.tags and "<script>x" in "".join(parser.texts)
    assert "&lt;script&gt;x" in text
    outside = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in outside and "https://" not in outside
    for attr in ("src", "href"):
        for el in root.iter():
            value = el.get(attr)
            assert value is None or not value.startswith(("http:", "https:", "//"))
    # The domain table is sorted by name.
    ns = "{http://www.w3.org/1999/xhtml}"
    table = next(el for el in root.iter() if el.get("id") == "domains")
    names = [
        "".join(row[0].itertext())
        for row in table.iter(f"{ns}tr" if table.tag.startswith(ns) else "tr")
        if len(row) == 12 and row[0].tag.endswith("td")
    ]
    assert names == sorted(names) == ["<script>x", "db01", "web01"]
    # Charts: 30 daily bars, and one line chart per current disk.
    chart = next(el for el in root.iter() if el.get("id") == "reclaim-chart")
    assert len([el for el in chart.iter() if el.tag.endswith("rect")]) == 30
    disk_charts = [el for el in root.iter() if el.get("class") == "disk-chart"]
    assert len(disk_charts) == 3
    totals = "".join(next(el for el in root.iter() if el.get("id") == "totals").itertext())
    assert "1000.0 MiB" in totals and "8.0 GiB" in totals


def test_api_serves_the_status_json(daemon: Daemon) -> None:
    assert daemon.server is not None
    status, headers, body = get(daemon.server.url + "/api/v1/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert [d["domain"] for d in doc["domains"]] == ["<script>x", "db01", "web01"]
    assert doc["totals"]["reclaimed_30d_bytes"] == 1000 << 20
    # /metrics still answers beside it.
    status, _, metrics = get(daemon.server.metrics_url)
    assert status == 200 and b"virt_trimd_build_info" in metrics


def _self_signed(directory: Path) -> None:
    # openssl is installed by .ci/install-deps.sh; without it this test fails.
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key", "-out",
            "server.crt", "-days", "2", "-subj", "/CN=virt-trimd-test", "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def test_page_and_api_behind_tls_and_basic_auth(tmp_path: Path) -> None:
    _self_signed(tmp_path)
    web = write_web_config(
        tmp_path,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  operator: {PASSWORD_HASH}\n",
    )
    d = make_daemon(tmp_path, web)
    try:
        assert d.server is not None and d.server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(tmp_path / "server.crt"))
        good = {
            "Authorization": "Basic " + base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
        }
        for path in ("/", "/api/v1/status"):
            with pytest.raises(HTTPError) as denied:
                get(d.server.url + path, {}, context)
            assert denied.value.code == 401
            status, _, body = get(d.server.url + path, good, context)
            assert status == 200 and b"web01" in body
    finally:
        assert d.server is not None and d.history is not None
        d.server.shutdown()
        d.history.close()
