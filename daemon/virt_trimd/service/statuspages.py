"""The daemon's status page `/` and `/api/v1/status`: the `status` report, live.

Built per request from the daemon's own history connection and the scheduler's real
next fire times (State), in the HTTP request's thread; /metrics never waits for it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from virt_trimd import __version__
from virt_trimd.engine.history import HistoryError
from virt_trimd.engine.status import build_charts, build_status, status_to_json
from virt_trimd.web.page import CONTENT_SECURITY_POLICY, render_status_page

if TYPE_CHECKING:
    from virt_trimd.config.model import Config
    from virt_trimd.engine.history import History
    from virt_trimd.engine.state import State
    from virt_trimd.engine.status import StatusReport
    from virt_trimd.web.server import Page

# A rendered page or document is served again for this long. Rendering takes the GIL for
# tens of milliseconds at 1,000 disks, so a page reloaded in a loop (or many viewers)
# would otherwise take that CPU from /metrics scrapes; the census changes every minutes.
RENDER_TTL_SECONDS = 10.0

_HTML = "text/html; charset=utf-8"
_JSON = "application/json"
_HEADERS: Sequence[tuple[str, str]] = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)


class StatusSource(Protocol):
    """What the pages read: the Daemon has these attributes (so has the scrape benchmark)."""

    history: History | None
    config: Config
    state: State
    hostname: str
    tz: dt.tzinfo


class HistoryUnavailable(Exception):
    """The daemon runs without its history (it could not open it at start)."""


def _report(daemon: StatusSource, now: float) -> StatusReport:
    history = daemon.history
    if history is None:
        raise HistoryUnavailable
    return build_status(
        history,
        daemon.config,
        now,
        hostname=daemon.hostname,
        next_runs=dict(daemon.state.snapshot().next_run_ts),
    )


Rendered = tuple[str, bytes, Sequence[tuple[str, str]]]


def _cached(render: Callable[[], Rendered]) -> Callable[[], Rendered]:
    """`render`, called at most once per RENDER_TTL_SECONDS; concurrent callers share it."""
    lock = threading.Lock()
    kept: list[tuple[float, Rendered]] = []

    def serve() -> Rendered:
        with lock:
            now = time.monotonic()
            if kept and now - kept[0][0] < RENDER_TTL_SECONDS:
                return kept[0][1]
            result = render()
            kept[:] = [(now, result)]
            return result

    return serve


def status_pages(daemon: StatusSource) -> dict[str, Page]:
    """Path -> renderer, for MetricsServer.serve_pages."""

    def page() -> Rendered:
        now = time.time()
        try:
            report = _report(daemon, now)
            assert daemon.history is not None
            charts = build_charts(daemon.history, now, daemon.tz)
        except (HistoryUnavailable, HistoryError) as exc:
            text = (
                f"virt-trimd: the history is unavailable ({exc or 'not open'}); see the journal\n"
            )
            return "text/plain; charset=utf-8", text.encode(), _HEADERS
        body = render_status_page(
            report, charts, daemon.tz, version=__version__, hostname=daemon.hostname
        )
        return _HTML, body, _HEADERS

    def api() -> Rendered:
        try:
            doc = status_to_json(_report(daemon, time.time()))
        except (HistoryUnavailable, HistoryError) as exc:
            doc = {"error": f"the history is unavailable: {exc or 'not open'}"}
        return _JSON, (json.dumps(doc, indent=2) + "\n").encode(), _HEADERS

    return {"/": _cached(page), "/api/v1/status": _cached(api)}
